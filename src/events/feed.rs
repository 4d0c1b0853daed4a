//! The per-process event feed: one task that recomputes the [`Horizon`] and
//! publishes it on a `watch` channel that every reader of this process
//! follows, and the wake-ups that tell it when to.
//!
//! No writing transaction notifies anyone (a `NOTIFY` inside a debit
//! transaction takes a cluster-wide lock at commit and serializes every
//! commit behind it; `migrations/0031`). Instead:
//!
//! - a writer of this process calls [`CommitSignal::committed`] after its
//!   commit: the horizon task of this process wakes in memory, with no round
//!   trip;
//! - the same call asks this process's *announcer* to tell the other
//!   replicas: it sends `NOTIFY balance_events` from a connection of its own,
//!   outside any transaction of a writer, at most once per
//!   [`FeedSettings::notify_interval`] however many commits it covers
//!   (the payload names the sender, so a feed ignores its own announcements);
//! - a `LISTEN balance_events` connection wakes the horizon task when another
//!   replica announces;
//! - and the horizon task polls every [`FeedSettings::poll_interval`] anyway:
//!   a lost notification, a reconnect, or a writer that announces nothing
//!   (another tool, `psql`) costs latency, never an event.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{ConnectOptions, PgConnection, PgPool};
use tokio::sync::{Notify, watch};

use super::Horizon;

/// The Postgres notification channel replicas announce their commits on.
pub const NOTIFY_CHANNEL: &str = "balance_events";

#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// Recompute the horizon at least this often (lost notifications,
    /// reconnects, writers that announce nothing): the longest an event
    /// committed by another replica waits when its announcement is lost.
    pub poll_interval: Duration,
    /// While candidates wait for running writers, check again this soon
    /// (doubling up to `poll_interval` while they keep waiting).
    pub recheck_interval: Duration,
    /// At most one `NOTIFY` to the other replicas per this interval: the
    /// commits of one interval share one announcement.
    pub notify_interval: Duration,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
            recheck_interval: Duration::from_millis(5),
            notify_interval: Duration::from_millis(2),
        }
    }
}

/// What a writer of this process tells the feed after committing balance
/// events; cheap to clone, never blocks, never fails.
///
/// The default signal is connected to no feed (a writer with no feed in its
/// process): other readers then learn of its commits by polling.
#[derive(Clone, Default)]
pub struct CommitSignal {
    wakes: Option<Arc<Wakes>>,
}

struct Wakes {
    /// The horizon task of this process.
    horizon: Notify,
    /// The announcer (one coalesced `NOTIFY` to the other replicas).
    announce: Notify,
}

impl CommitSignal {
    /// Balance events were just committed by this process: recompute the
    /// horizon now and announce them to the other replicas soon. Call it
    /// after the commit, never before (a reader woken early would find
    /// nothing new and wait for the next wake-up or poll).
    pub fn committed(&self) {
        if let Some(wakes) = &self.wakes {
            wakes.horizon.notify_one();
            wakes.announce.notify_one();
        }
    }
}

/// A handle on the process's feed; cheap to clone.
#[derive(Clone)]
pub struct EventFeed {
    pool: PgPool,
    horizon: watch::Receiver<i64>,
    stop: Arc<watch::Sender<bool>>,
    commits: CommitSignal,
}

impl EventFeed {
    /// Starts the listener, the announcer and the horizon task; they run
    /// until [`EventFeed::stop`] or until every handle is dropped.
    pub fn start(pool: PgPool, settings: FeedSettings) -> EventFeed {
        let (horizon_sender, horizon) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let wakes = Arc::new(Wakes {
            horizon: Notify::new(),
            announce: Notify::new(),
        });
        // Names this process's announcements, so its own listener skips them.
        let sender = uuid::Uuid::new_v4().simple().to_string();
        tokio::spawn(listen(
            pool.clone(),
            wakes.clone(),
            sender.clone(),
            stop.subscribe(),
        ));
        tokio::spawn(announce(
            pool.clone(),
            wakes.clone(),
            sender,
            settings.notify_interval,
            stop.subscribe(),
        ));
        tokio::spawn(track_horizon(
            pool.clone(),
            settings,
            wakes.clone(),
            horizon_sender,
            stop.subscribe(),
        ));
        EventFeed {
            pool,
            horizon,
            stop: Arc::new(stop),
            commits: CommitSignal { wakes: Some(wakes) },
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

    /// The signal this process's writers give after committing events.
    pub fn commits(&self) -> CommitSignal {
        self.commits.clone()
    }

    /// Stops the tasks; every reader following this feed ends.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Wakes the horizon task on every other replica's announcement, and after
/// a reconnect (announcements sent while disconnected are lost).
async fn listen(pool: PgPool, wakes: Arc<Wakes>, own: String, mut stop: watch::Receiver<bool>) {
    loop {
        let listened = relay(&pool, &wakes.horizon, &own);
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

/// Forwards other replicas' announcements as wake-ups until the connection
/// fails for good.
async fn relay(pool: &PgPool, wake: &Notify, own: &str) -> Result<Infallible, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    wake.notify_one();
    loop {
        match listener.try_recv().await? {
            // This process's own announcement: its feed was woken in memory already.
            Some(notification) if notification.payload() == own => continue,
            Some(_) => {}
            None => tracing::warn!("event listener reconnecting"),
        }
        wake.notify_one();
    }
}

/// Tells the other replicas that this one committed events: one `NOTIFY`
/// per burst of commits, at most one per `interval`, from a connection of
/// its own (never inside a writer's transaction). A failure costs the other
/// replicas latency only: they poll.
async fn announce(
    pool: PgPool,
    wakes: Arc<Wakes>,
    own: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut connection: Option<PgConnection> = None;
    loop {
        tokio::select! {
            _ = wakes.announce.notified() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let pause = match send_announcement(&pool, &mut connection, &own).await {
            Ok(()) => interval,
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot announce committed events to other replicas; they will poll");
                connection = None;
                // Commits meanwhile merge into the next announcement.
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

async fn send_announcement(
    pool: &PgPool,
    connection: &mut Option<PgConnection>,
    own: &str,
) -> Result<(), sqlx::Error> {
    if pool.is_closed() {
        return Err(sqlx::Error::PoolClosed);
    }
    let connection = match connection {
        Some(connection) => connection,
        None => connection.insert(pool.connect_options().connect().await?),
    };
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(own)
        .execute(connection)
        .await?;
    Ok(())
}

async fn track_horizon(
    pool: PgPool,
    settings: FeedSettings,
    wakes: Arc<Wakes>,
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
            _ = wakes.horizon.notified() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}
