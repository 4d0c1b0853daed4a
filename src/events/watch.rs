//! One live reader (a gRPC stream): replays after its cursor, then follows
//! the horizon. It pulls from the table into a bounded channel; a reader
//! that stops taking events fills its channel, and after `stall_timeout` it
//! is told to resume from its cursor instead of holding a task forever.

use std::time::Duration;

use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{mpsc, oneshot};

use super::{BalanceEvent, EventFeed, EventFilter, read_events};

#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Events buffered per stream between the database and the client.
    pub buffer: usize,
    /// Events read per query.
    pub batch_size: i64,
    /// How long a full buffer may wait for the client before the stream ends.
    pub stall_timeout: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            buffer: 256,
            batch_size: 256,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a stream ended on the server's side; the reader resumes with
/// `after_cursor = resume_after` and misses nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The reader left its buffer full for longer than the stall timeout.
    TooFarBehind { resume_after: i64 },
    /// The process is stopping.
    ShuttingDown { resume_after: i64 },
    /// The database failed; already logged.
    Interrupted { resume_after: i64 },
}

/// The receiving side: events in cursor order, then (maybe) why they stopped.
pub struct Watcher {
    pub events: mpsc::Receiver<BalanceEvent>,
    pub end: oneshot::Receiver<WatchEnd>,
}

/// Starts a reader of `filter` after `after`; it stops when the receiver is
/// dropped, the feed stops, or the reader stalls.
pub fn watch(
    feed: &EventFeed,
    filter: EventFilter,
    after: i64,
    settings: &WatchSettings,
) -> Watcher {
    let (events_sender, events) = mpsc::channel(settings.buffer.max(1));
    let (end_sender, end) = oneshot::channel();
    let feed = feed.clone();
    let settings = settings.clone();
    tokio::spawn(async move {
        if let Some(reason) = produce(feed, filter, after, settings, events_sender).await {
            let _ = end_sender.send(reason);
        }
    });
    Watcher { events, end }
}

/// Returns why the stream ended, or `None` when the receiver went away.
async fn produce(
    feed: EventFeed,
    filter: EventFilter,
    after: i64,
    settings: WatchSettings,
    sender: mpsc::Sender<BalanceEvent>,
) -> Option<WatchEnd> {
    let mut horizon = feed.horizon();
    let mut cursor = after;
    loop {
        let safe = *horizon.borrow_and_update();
        // Everything up to `safe`, a batch at a time.
        loop {
            if horizon.has_changed().is_err() {
                return Some(WatchEnd::ShuttingDown {
                    resume_after: cursor,
                });
            }
            let read = tokio::select! {
                read = read_events(feed.pool(), &filter, cursor, safe, settings.batch_size) => read,
                _ = sender.closed() => return None,
            };
            let batch = match read {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, cursor, "event stream interrupted");
                    return Some(WatchEnd::Interrupted {
                        resume_after: cursor,
                    });
                }
            };
            let complete = (batch.len() as i64) < settings.batch_size;
            for event in batch {
                let event_cursor = event.cursor;
                match sender.send_timeout(event, settings.stall_timeout).await {
                    Ok(()) => cursor = event_cursor,
                    Err(SendTimeoutError::Timeout(_)) => {
                        tracing::info!(cursor, "event stream reader stalled; ending its stream");
                        return Some(WatchEnd::TooFarBehind {
                            resume_after: cursor,
                        });
                    }
                    Err(SendTimeoutError::Closed(_)) => return None,
                }
            }
            if complete {
                // Nothing else for this filter up to `safe`: skip the range next time.
                cursor = cursor.max(safe);
                break;
            }
        }
        tokio::select! {
            changed = horizon.changed() => {
                if changed.is_err() {
                    return Some(WatchEnd::ShuttingDown { resume_after: cursor });
                }
            }
            _ = sender.closed() => return None,
        }
    }
}
