//! The shared event reader of a process: ONE task follows the feed's
//! horizon, reads each committed range of events once (all accounts, in
//! cursor order) and hands them to the live streams that watch them.
//!
//! Streams register here ([`EventHub::subscribe`]) and get a bounded
//! channel of [`LiveBatch`]es: a stream of one account is sent only that
//! account's events, an all-accounts stream every event. A stream whose
//! account has no events is neither sent anything nor woken, and it never
//! queries the database after its catch-up. While nobody is registered the
//! reader reads nothing at all: it only moves its position to the horizon.
//!
//! A stream that does not keep up (its channel is full when a batch is
//! handed over) is unregistered: its channel closes after what it already
//! holds, and the stream reads from the database after its own cursor until
//! it has caught up, then registers again ([`super::watch`]). So a slow
//! stream costs the reader nothing and still misses nothing.
//!
//! Registration and hand-over share one lock: a stream registered at
//! position `P` (everything up to `P` was handed to the streams registered
//! before it) receives every batch after `P`, and reads `(its cursor, P]`
//! from the database itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{BalanceEvent, EventFeed, EventFilter, read_events};
use crate::telemetry::metrics;

/// How the shared reader reads and how much each stream may hold.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Events read per query of the shared reader.
    pub batch_size: i64,
    /// Batches a registered stream may hold before it is unregistered and
    /// left to catch up from the database on its own.
    pub stream_buffer_batches: usize,
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            batch_size: 1024,
            stream_buffer_batches: 64,
        }
    }
}

/// Events handed to one stream at once, in cursor order.
#[derive(Debug, Clone)]
pub struct LiveBatch {
    /// This stream's events of the batch (shared by every stream of the same filter).
    pub events: Arc<[BalanceEvent]>,
    /// Every event up to this cursor has been handed over: a stream that
    /// took this batch has seen everything of its filter up to here.
    pub through: i64,
}

/// Counters of the shared reader (tests and `/metrics`).
#[derive(Debug, Default)]
pub struct HubStats {
    /// Queries of the shared reader.
    pub reads: AtomicU64,
    /// Batches handed to streams (one per stream per batch that has its events).
    pub deliveries: AtomicU64,
    /// Streams unregistered because their buffer was full.
    pub lagged: AtomicU64,
}

/// A registered stream's side: batches after `joined_at`.
pub struct Subscription {
    /// Everything up to here was handed over before this stream registered:
    /// the stream reads it from the database itself.
    pub joined_at: i64,
    pub batches: mpsc::Receiver<LiveBatch>,
    _registration: Registration,
}

/// Unregisters its stream when dropped (a stream that ends costs nothing more).
struct Registration {
    hub: Arc<Shared>,
    key: Key,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = self.hub.lock();
        registry.remove(&self.key, self.id);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    All,
    Account(String),
}

struct Registry {
    /// Every event up to here has been handed to the registered streams.
    position: i64,
    by_account: HashMap<String, HashMap<u64, mpsc::Sender<LiveBatch>>>,
    all: HashMap<u64, mpsc::Sender<LiveBatch>>,
    next_id: u64,
}

impl Registry {
    fn is_empty(&self) -> bool {
        self.by_account.is_empty() && self.all.is_empty()
    }

    fn remove(&mut self, key: &Key, id: u64) {
        match key {
            Key::All => {
                self.all.remove(&id);
            }
            Key::Account(account) => {
                if let Some(streams) = self.by_account.get_mut(account) {
                    streams.remove(&id);
                    if streams.is_empty() {
                        self.by_account.remove(account);
                    }
                }
            }
        }
    }
}

struct Shared {
    registry: Mutex<Registry>,
    stopped: AtomicBool,
    stats: HubStats,
    settings: HubSettings,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle on the process's shared reader; cheap to clone.
#[derive(Clone)]
pub struct EventHub {
    shared: Arc<Shared>,
    feed: EventFeed,
}

impl EventHub {
    /// Starts the reader on `feed`; it stops with the feed.
    pub fn start(feed: &EventFeed, settings: HubSettings) -> EventHub {
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry {
                position: 0,
                by_account: HashMap::new(),
                all: HashMap::new(),
                next_id: 0,
            }),
            stopped: AtomicBool::new(false),
            stats: HubStats::default(),
            settings,
        });
        tokio::spawn(run(feed.clone(), shared.clone()));
        EventHub {
            shared,
            feed: feed.clone(),
        }
    }

    pub fn feed(&self) -> &EventFeed {
        &self.feed
    }

    pub fn stats(&self) -> &HubStats {
        &self.shared.stats
    }

    /// True once the feed stopped: no batch will come any more.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Registers a stream of `filter`; `None` once the reader stopped.
    pub fn subscribe(&self, filter: &EventFilter) -> Option<Subscription> {
        let (sender, batches) = mpsc::channel(self.shared.settings.stream_buffer_batches.max(1));
        let key = match filter {
            EventFilter::AllAccounts => Key::All,
            EventFilter::Account(account) => Key::Account(account.as_str().to_owned()),
        };
        let mut registry = self.shared.lock();
        // Checked under the lock: the reader clears the registry under it when it stops.
        if self.is_stopped() {
            return None;
        }
        let id = registry.next_id;
        registry.next_id += 1;
        match &key {
            Key::All => {
                registry.all.insert(id, sender);
            }
            Key::Account(account) => {
                registry
                    .by_account
                    .entry(account.clone())
                    .or_default()
                    .insert(id, sender);
            }
        }
        let joined_at = registry.position;
        drop(registry);
        Some(Subscription {
            joined_at,
            batches,
            _registration: Registration {
                hub: self.shared.clone(),
                key,
                id,
            },
        })
    }
}

/// The reader: after every horizon move, reads what is new (if anyone
/// listens) and hands it over.
async fn run(feed: EventFeed, shared: Arc<Shared>) {
    let mut horizon = feed.horizon();
    let mut failing = false;
    loop {
        let safe = *horizon.borrow_and_update();
        match read_through(&feed, &shared, safe).await {
            Ok(()) => {
                if failing {
                    tracing::info!("shared event reader recovered");
                    failing = false;
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "shared event reader cannot read; retrying every second");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                if horizon.has_changed().is_err() {
                    return stop(&shared);
                }
                continue;
            }
        }
        if horizon.changed().await.is_err() {
            return stop(&shared);
        }
    }
}

/// Reads and hands over everything up to `safe`, a batch at a time.
async fn read_through(
    feed: &EventFeed,
    shared: &Shared,
    safe: i64,
) -> Result<(), crate::BillingError> {
    loop {
        let from = {
            let mut registry = shared.lock();
            if registry.position >= safe {
                return Ok(());
            }
            if registry.is_empty() {
                // Nobody to hand anything to: a later stream reads this range itself.
                registry.position = safe;
                return Ok(());
            }
            registry.position
        };
        let events = read_events(
            feed.pool(),
            &EventFilter::AllAccounts,
            from,
            safe,
            shared.settings.batch_size,
        )
        .await?;
        shared.stats.reads.fetch_add(1, Ordering::Relaxed);
        metrics::event_reader_read();
        let through = if (events.len() as i64) < shared.settings.batch_size {
            safe
        } else {
            events.last().map_or(safe, |event| event.cursor)
        };
        hand_over(shared, events, through);
    }
}

fn stop(shared: &Shared) {
    let mut registry = shared.lock();
    shared.stopped.store(true, Ordering::Release);
    // Dropping the senders closes every stream's channel: they end once drained.
    registry.all.clear();
    registry.by_account.clear();
}

/// Hands `events` (everything of `(position, through]`) to the streams
/// that watch them, and moves the position to `through`.
fn hand_over(shared: &Shared, events: Vec<BalanceEvent>, through: i64) {
    let mut registry = shared.lock();
    let mut lagging: Vec<(Key, u64)> = Vec::new();
    if !registry.by_account.is_empty() {
        let mut per_account: HashMap<&str, Vec<BalanceEvent>> = HashMap::new();
        for event in &events {
            if registry.by_account.contains_key(event.account_id.as_str()) {
                per_account
                    .entry(event.account_id.as_str())
                    .or_default()
                    .push(event.clone());
            }
        }
        for (account, account_events) in per_account {
            let batch = LiveBatch {
                events: account_events.into(),
                through,
            };
            if let Some(streams) = registry.by_account.get(account) {
                for (id, sender) in streams {
                    if !offer(shared, sender, &batch) {
                        lagging.push((Key::Account(account.to_owned()), *id));
                    }
                }
            }
        }
    }
    if !registry.all.is_empty() && !events.is_empty() {
        let batch = LiveBatch {
            events: events.into(),
            through,
        };
        for (id, sender) in &registry.all {
            if !offer(shared, sender, &batch) {
                lagging.push((Key::All, *id));
            }
        }
    }
    for (key, id) in lagging {
        registry.remove(&key, id);
    }
    registry.position = registry.position.max(through);
}

/// False when the stream cannot take the batch now (full, or gone).
fn offer(shared: &Shared, sender: &mpsc::Sender<LiveBatch>, batch: &LiveBatch) -> bool {
    match sender.try_send(batch.clone()) {
        Ok(()) => {
            shared.stats.deliveries.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            shared.stats.lagged.fetch_add(1, Ordering::Relaxed);
            metrics::event_stream_lagged();
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}
