//! The balance event stream: a global cursor that is safe over concurrent
//! writers, catch-up from the table, live wake-ups between replicas, and
//! persisted-cursor subscribers for the engines.
//!
//! # The global cursor
//!
//! Every ledger entry writes one `balance_events` row in its transaction;
//! `cursor` comes from a sequence. Sequence values are taken in one order and
//! committed in another, so "everything committed after cursor N" is not a
//! sound reader: it may deliver 7 while 6 is still uncommitted, and a client
//! resuming after 7 would never see 6.
//!
//! A reader therefore only reads up to the *horizon*: a cursor `H` such that
//! every event with `cursor <= H` that will ever commit has committed. Below
//! the horizon cursors are final; reading `cursor > after AND cursor <= H
//! ORDER BY cursor` can neither skip nor repeat anything. The horizon is
//! established in [`horizon`] like this:
//!
//! 1. Read `L`, the sequence's last handed-out value.
//! 2. Then take a fresh transaction id `N` (`pg_current_xact_id()` in its own
//!    committed statement). Transaction ids are assigned in increasing order,
//!    and a writer holds its id *before* it takes a cursor (the column default
//!    makes sure, see `migrations/0003`). So every writer of a cursor `<= L`
//!    got its id before step 1, and that id is `< N`.
//! 3. Later, when a snapshot has `pg_snapshot_xmin >= N`, no transaction with
//!    an id below `N` is running (ids below the snapshot's `xmax` that still
//!    run are listed in it, and `xmax > N` once `N` has committed). So every
//!    writer of a cursor `<= L` has committed or rolled back: `L` is the new
//!    horizon.
//!
//!    Only a transaction of *this* database can write its events, so when
//!    the cluster-wide `xmin` keeps a candidate waiting (a long transaction
//!    of another database, a `DROP DATABASE` waiting for its checkpoint),
//!    the horizon asks, after `horizon::LOCAL_CHECK_AFTER` (50 ms), for the
//!    oldest transaction of this database the snapshot lists as running
//!    (`pg_locks`, `pg_stat_activity.datid`, `pg_prepared_xacts`): no
//!    transaction of this database below it runs, which proves the same.
//!
//! When nothing else runs, step 3 succeeds on the very next snapshot; a
//! long-running transaction of this database holds the horizon back until
//! it ends, which delays events but never reorders them; one of another
//! database delays them by about `horizon::LOCAL_CHECK_AFTER` (50 ms). Checking
//! `writer_xid < xmin` per event alone is *not* enough: a transaction with
//! a higher id can hold a lower cursor.
//!
//! # Delivery
//!
//! One [`EventFeed`] per process computes the horizon and publishes it on a
//! `watch` channel. No writing transaction notifies anything (a `NOTIFY` in
//! the debit transaction serialized every commit; `migrations/0031`): a
//! writer of this process wakes the feed in memory after its commit
//! ([`CommitSignal`]); the feed's announcer then sends one coalesced
//! `NOTIFY balance_events` per few milliseconds, from a connection of its
//! own, to wake the other replicas' feeds; and every feed also polls on a
//! short interval, so a lost notification, a reconnect or a writer that
//! announces nothing costs latency only.
//!
//! One [`EventHub`] per process follows that horizon and reads each new
//! range of events once, for every account, then hands each live gRPC
//! stream ([`watch`]) the events of the account it watches (all of them to
//! service-role all-accounts streams). A stream reads the table itself only
//! to catch up: from its `after_cursor` at the start, and after it fell
//! behind the shared reader (its bounded buffer overflowed); then it
//! registers again. A stream of an account without events is never woken
//! and never queries. The engines ([`Subscriber`]) keep their own
//! persisted cursors and pull from the table at their own pace. A slow
//! reader holds no lock and blocks no writer and no other reader.

mod feed;
mod horizon;
mod hub;
mod read;
mod subscriber;
mod watch;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

pub use feed::{CommitSignal, EventFeed, FeedSettings};
pub use horizon::Horizon;
pub use hub::{EventHub, HubSettings, HubStats, LiveBatch, Subscription};
pub use read::{EventFilter, read_events};
pub use subscriber::{Batch, EventHandler, Subscriber};
pub use watch::{WatchEnd, WatchSettings, WatchStats, Watcher, watch};

use crate::money::Currency;

/// What happened to the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BalanceEventKind {
    Debited,
    Credited,
    ToppedUp,
}

impl BalanceEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BalanceEventKind::Debited => "debited",
            BalanceEventKind::Credited => "credited",
            BalanceEventKind::ToppedUp => "topped_up",
        }
    }

    pub fn parse(text: &str) -> Option<BalanceEventKind> {
        [
            BalanceEventKind::Debited,
            BalanceEventKind::Credited,
            BalanceEventKind::ToppedUp,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

/// One committed balance change, in global cursor order.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceEvent {
    pub cursor: i64,
    pub account_id: String,
    /// Per account: 1, 2, 3 … with no gaps.
    pub sequence: i64,
    pub kind: BalanceEventKind,
    /// Signed: negative for debits.
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub total_balance_after: Decimal,
    pub transaction_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub currency: Currency,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_round_trip_through_their_column_text() {
        for kind in [
            BalanceEventKind::Debited,
            BalanceEventKind::Credited,
            BalanceEventKind::ToppedUp,
        ] {
            assert_eq!(BalanceEventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(BalanceEventKind::parse("refunded"), None);
    }

    #[test]
    fn ledger_entry_kinds_all_produce_known_event_kinds() {
        for kind in crate::ledger::EntryKind::ALL {
            assert!(BalanceEventKind::parse(kind.event_kind()).is_some());
        }
    }
}
