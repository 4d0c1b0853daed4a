//! The per-process event feed: one `LISTEN balance_events` connection and
//! one task that recomputes the [`Horizon`] on every notification and on a
//! polling interval, publishing it on a `watch` channel that every reader
//! of this process follows.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};

use super::Horizon;

/// The Postgres notification channel the `balance_events` trigger notifies.
pub const NOTIFY_CHANNEL: &str = "balance_events";

#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// Recompute the horizon at least this often (lost notifications,
    /// reconnects, writers that ended without notifying).
    pub poll_interval: Duration,
    /// While candidates wait for running writers, check again this soon.
    pub recheck_interval: Duration,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            recheck_interval: Duration::from_millis(10),
        }
    }
}

/// A handle on the process's feed; cheap to clone.
#[derive(Clone)]
pub struct EventFeed {
    pool: PgPool,
    horizon: watch::Receiver<i64>,
    stop: Arc<watch::Sender<bool>>,
}

impl EventFeed {
    /// Starts the listener and the horizon task; they run until [`EventFeed::stop`]
    /// or until every handle is dropped.
    pub fn start(pool: PgPool, settings: FeedSettings) -> EventFeed {
        let (horizon_sender, horizon) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let wake = Arc::new(Notify::new());
        tokio::spawn(listen(pool.clone(), wake.clone(), stop.subscribe()));
        tokio::spawn(track_horizon(
            pool.clone(),
            settings,
            wake,
            horizon_sender,
            stop.subscribe(),
        ));
        EventFeed {
            pool,
            horizon,
            stop: Arc::new(stop),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The safe cursor, updated as events commit. `changed()` fails once the
    /// feed stopped: readers end then.
    pub fn horizon(&self) -> watch::Receiver<i64> {
        self.horizon.clone()
    }

    /// Stops the tasks; every reader following this feed ends.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Wakes the horizon task on every notification, and after a reconnect
/// (notifications sent while disconnected are lost).
async fn listen(pool: PgPool, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    loop {
        let listened = relay(&pool, &wake);
        tokio::select! {
            result = listened => {
                let Err(error) = result;
                if matches!(error, sqlx::Error::PoolClosed) {
                    return;
                }
                tracing::warn!(%error, "event listener failed; retrying");
            }
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// Forwards notifications as wake-ups until the connection fails for good.
async fn relay(pool: &PgPool, wake: &Notify) -> Result<Infallible, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    wake.notify_one();
    loop {
        if listener.try_recv().await?.is_none() {
            tracing::warn!("event listener reconnecting");
        }
        wake.notify_one();
    }
}

async fn track_horizon(
    pool: PgPool,
    settings: FeedSettings,
    wake: Arc<Notify>,
    sender: watch::Sender<i64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut horizon = Horizon::new();
    let mut failing = false;
    // Backs off while a long-running writer holds the horizon back.
    let mut recheck = settings.recheck_interval;
    loop {
        match horizon.advance(&pool).await {
            Ok(safe) => {
                if failing {
                    tracing::info!("event horizon recovered");
                    failing = false;
                }
                let moved = sender.send_if_modified(|published| {
                    let moved = safe > *published;
                    if moved {
                        *published = safe;
                    }
                    moved
                });
                if moved {
                    recheck = settings.recheck_interval;
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot advance the event horizon; retrying");
                    failing = true;
                }
            }
        }
        let pause = if horizon.has_candidates() {
            let pause = recheck;
            recheck = (recheck * 2).min(settings.poll_interval);
            pause
        } else {
            recheck = settings.recheck_interval;
            settings.poll_interval
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}
