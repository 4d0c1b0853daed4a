//! One live reader (a gRPC stream): replays after its cursor from the
//! database, then takes its events from the process's shared reader
//! ([`EventHub`]), and hands them to the client through a bounded channel.
//!
//! - Catch-up: the stream registers with the hub first (at position `P`),
//!   then reads `(cursor, P]` itself; from then on the hub hands it every
//!   batch after `P`. Nothing falls between the two, nothing comes twice.
//! - Lag: when the stream's hub buffer overflows the hub drops it; the
//!   stream delivers what it holds, reads on from the database after its
//!   own cursor, and registers again.
//! - Stall: a client that leaves its channel full for `stall_timeout` is
//!   told to resume from its cursor instead of holding a task forever.
//! - Expiry: at the token's end (plus leeway) the stream stops with its
//!   resume cursor; the client reconnects with a fresh token.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{mpsc, oneshot};

use super::{BalanceEvent, EventFilter, EventHub, read_events};
use crate::telemetry::metrics;

#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Events buffered per stream between the reader and the client.
    pub buffer: usize,
    /// Events read per query while a stream catches up on its own.
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
    /// The caller's token expired (its `exp` plus the leeway passed).
    TokenExpired { resume_after: i64 },
}

impl WatchEnd {
    /// The cursor to resume after.
    pub fn resume_after(self) -> i64 {
        match self {
            WatchEnd::TooFarBehind { resume_after }
            | WatchEnd::ShuttingDown { resume_after }
            | WatchEnd::Interrupted { resume_after }
            | WatchEnd::TokenExpired { resume_after } => resume_after,
        }
    }
}

/// What one stream cost: its own database queries and its wake-ups.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Queries this stream ran itself (catch-up at the start and after lagging).
    pub reads: AtomicU64,
    /// Batches the shared reader handed to this stream.
    pub wakeups: AtomicU64,
    /// Times it fell behind the shared reader and caught up from the database.
    pub lag_recoveries: AtomicU64,
}

/// The receiving side: events in cursor order, then (maybe) why they stopped.
pub struct Watcher {
    pub events: mpsc::Receiver<BalanceEvent>,
    pub end: oneshot::Receiver<WatchEnd>,
    pub stats: Arc<WatchStats>,
}

/// Starts a reader of `filter` after `after`; it stops when the receiver is
/// dropped, the feed stops, the reader stalls, or at `valid_until` (the
/// caller's token expiry, leeway included).
pub fn watch(
    hub: &EventHub,
    filter: EventFilter,
    after: i64,
    settings: &WatchSettings,
    valid_until: Option<tokio::time::Instant>,
) -> Watcher {
    let (events_sender, events) = mpsc::channel(settings.buffer.max(1));
    let (end_sender, end) = oneshot::channel();
    let stats = Arc::new(WatchStats::default());
    let stream = Stream {
        hub: hub.clone(),
        filter,
        settings: settings.clone(),
        sender: events_sender,
        delivered: AtomicI64::new(after),
        stats: stats.clone(),
    };
    tokio::spawn(async move {
        let reason = match valid_until {
            Some(deadline) => tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => Some(WatchEnd::TokenExpired {
                    resume_after: stream.delivered.load(Ordering::Acquire),
                }),
                reason = stream.produce() => reason,
            },
            None => stream.produce().await,
        };
        if let Some(reason) = reason {
            let _ = end_sender.send(reason);
        }
    });
    Watcher { events, end, stats }
}

struct Stream {
    hub: EventHub,
    filter: EventFilter,
    settings: WatchSettings,
    sender: mpsc::Sender<BalanceEvent>,
    /// The cursor of the last event handed to the client's channel (or a
    /// position up to which the filter has no more events).
    delivered: AtomicI64,
    stats: Arc<WatchStats>,
}

/// The loop's verdict on one step.
enum Step {
    Continue,
    End(Option<WatchEnd>),
}

impl Stream {
    fn cursor(&self) -> i64 {
        self.delivered.load(Ordering::Acquire)
    }

    /// Returns why the stream ended, or `None` when the receiver went away.
    async fn produce(&self) -> Option<WatchEnd> {
        loop {
            let Some(mut subscription) = self.hub.subscribe(&self.filter) else {
                return Some(WatchEnd::ShuttingDown {
                    resume_after: self.cursor(),
                });
            };
            if let Step::End(reason) = self.catch_up(subscription.joined_at).await {
                return reason;
            }
            // Live: only woken when the shared reader has events of this filter.
            loop {
                let batch = tokio::select! {
                    batch = subscription.batches.recv() => batch,
                    _ = self.sender.closed() => return None,
                };
                let Some(batch) = batch else {
                    if self.hub.is_stopped() {
                        return Some(WatchEnd::ShuttingDown {
                            resume_after: self.cursor(),
                        });
                    }
                    // Dropped by the reader for lagging: catch up on our own, then rejoin.
                    self.stats.lag_recoveries.fetch_add(1, Ordering::Relaxed);
                    break;
                };
                self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                for event in batch.events.iter() {
                    if event.cursor <= self.cursor() {
                        continue;
                    }
                    if let Step::End(reason) = self.deliver(event.clone()).await {
                        return reason;
                    }
                }
                self.advance_to(batch.through);
            }
        }
    }

    /// Reads `(cursor, until]` from the database and delivers it.
    async fn catch_up(&self, until: i64) -> Step {
        while self.cursor() < until {
            if self.hub.is_stopped() {
                return Step::End(Some(WatchEnd::ShuttingDown {
                    resume_after: self.cursor(),
                }));
            }
            let from = self.cursor();
            let read = tokio::select! {
                read = read_events(self.hub.feed().pool(), &self.filter, from, until, self.settings.batch_size) => read,
                _ = self.sender.closed() => return Step::End(None),
            };
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            metrics::event_stream_read();
            let batch = match read {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, cursor = from, "event stream interrupted");
                    return Step::End(Some(WatchEnd::Interrupted { resume_after: from }));
                }
            };
            let complete = (batch.len() as i64) < self.settings.batch_size;
            for event in batch {
                if let Step::End(reason) = self.deliver(event).await {
                    return Step::End(reason);
                }
            }
            if complete {
                // Nothing else for this filter up to `until`: skip the range.
                self.advance_to(until);
            }
        }
        Step::Continue
    }

    async fn deliver(&self, event: BalanceEvent) -> Step {
        let event_cursor = event.cursor;
        match self
            .sender
            .send_timeout(event, self.settings.stall_timeout)
            .await
        {
            Ok(()) => {
                self.advance_to(event_cursor);
                Step::Continue
            }
            Err(SendTimeoutError::Timeout(_)) => {
                let cursor = self.cursor();
                tracing::info!(cursor, "event stream reader stalled; ending its stream");
                Step::End(Some(WatchEnd::TooFarBehind {
                    resume_after: cursor,
                }))
            }
            Err(SendTimeoutError::Closed(_)) => Step::End(None),
        }
    }

    fn advance_to(&self, cursor: i64) {
        self.delivered.fetch_max(cursor, Ordering::AcqRel);
    }
}
