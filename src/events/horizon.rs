//! The cursor horizon: the largest cursor below which no event can still
//! commit. See the module header of `events` for why each step is needed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// Candidates waiting for their writers to finish; more than this and the
/// newest replaces the last (a later candidate is only ever more conservative).
const MAX_CANDIDATES: usize = 64;

/// How long the oldest candidate waits on the cluster-wide `xmin` before
/// the horizon also asks which transactions of *this* database still run
/// (see [`Horizon::advance`]).
pub const LOCAL_CHECK_AFTER: Duration = Duration::from_millis(50);

/// The oldest transaction still running in this database, among those a
/// snapshot lists as running (else the snapshot's `xmax`: none runs below
/// it). A running transaction holds the lock on its own id (`pg_locks`,
/// readable by any role, as `pg_stat_activity.datid` is); a prepared one is
/// in `pg_prepared_xacts`. Ids from the snapshot are 64-bit (`xid8`): no
/// wrap-around to mind.
const OLDEST_RUNNING_HERE_SQL: &str = "\
SELECT COALESCE(
         (SELECT min(x::text::bigint)
            FROM pg_snapshot_xip(pg_current_snapshot()) AS x
           WHERE EXISTS (SELECT 1
                           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                          WHERE l.locktype = 'transactionid' AND l.transactionid = xid(x)
                            AND a.datid = (SELECT oid FROM pg_database
                                            WHERE datname = current_database()))
              OR EXISTS (SELECT 1 FROM pg_prepared_xacts p
                          WHERE p.transaction = xid(x) AND p.database = current_database())),
         pg_snapshot_xmax(pg_current_snapshot())::text::bigint)";

/// A cursor that becomes safe once every transaction id below `xid` has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    cursor: i64,
    xid: i64,
    /// When it was proposed (replaced: when the newest was).
    since: Instant,
}

/// The horizon of one process: the safe cursor and the candidates after it.
#[derive(Debug, Default)]
pub struct Horizon {
    safe: i64,
    candidates: VecDeque<Candidate>,
}

impl Horizon {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event with a cursor up to this one has committed or never will.
    pub fn safe(&self) -> i64 {
        self.safe
    }

    pub fn has_candidates(&self) -> bool {
        !self.candidates.is_empty()
    }

    /// The newest cursor already safe or waiting to become so.
    fn newest_known(&self) -> i64 {
        self.candidates.back().map_or(self.safe, |c| c.cursor)
    }

    /// Records step 1 and 2: `cursor` was the sequence's last value, read
    /// before the transaction id `xid` was assigned.
    pub fn propose(&mut self, cursor: i64, xid: i64) {
        self.propose_at(cursor, xid, Instant::now());
    }

    fn propose_at(&mut self, cursor: i64, xid: i64, since: Instant) {
        if cursor <= self.newest_known() {
            return;
        }
        debug_assert!(
            self.candidates.back().is_none_or(|c| c.xid <= xid),
            "transaction ids only grow"
        );
        let candidate = Candidate { cursor, xid, since };
        if self.candidates.len() >= MAX_CANDIDATES {
            if let Some(last) = self.candidates.back_mut() {
                *last = candidate;
            }
        } else {
            self.candidates.push_back(candidate);
        }
    }

    /// True when the oldest candidate has waited at least `wait`.
    fn oldest_waited(&self, wait: Duration, now: Instant) -> bool {
        self.candidates
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.since) >= wait)
    }

    /// Step 3: a snapshot's `xmin` (no transaction below it still runs), or
    /// the oldest transaction of this database still running (no
    /// transaction of this database below it still runs: only those can
    /// write this database's events). Returns the new safe cursor.
    pub fn observe_xmin(&mut self, xmin: i64) -> i64 {
        while let Some(candidate) = self.candidates.front().copied() {
            if candidate.xid > xmin {
                break;
            }
            self.safe = self.safe.max(candidate.cursor);
            self.candidates.pop_front();
        }
        self.safe
    }

    /// Runs the three steps against the database; returns the safe cursor.
    pub async fn advance(&mut self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        // Each statement commits on its own and runs after the previous one
        // returned: the order of the steps is the proof.
        let last_cursor: i64 = sqlx::query_scalar(
            "SELECT COALESCE(pg_sequence_last_value('balance_events_cursor_seq'::regclass), 0)",
        )
        .fetch_one(pool)
        .await?;
        if last_cursor > self.newest_known() {
            let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
                .fetch_one(pool)
                .await?;
            self.propose(last_cursor, xid);
        }
        if self.has_candidates() {
            let xmin: i64 =
                sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                    .fetch_one(pool)
                    .await?;
            self.observe_xmin(xmin);
        }
        // The cluster-wide xmin is held back by any transaction of any
        // database (a long report, a DROP DATABASE waiting for its
        // checkpoint): once the oldest candidate has waited a while, ask
        // which transactions of this database still run. Not on every
        // step: the question reads the lock table.
        if self.oldest_waited(LOCAL_CHECK_AFTER, Instant::now()) {
            let oldest_here: i64 = sqlx::query_scalar(OLDEST_RUNNING_HERE_SQL)
                .fetch_one(pool)
                .await?;
            self.observe_xmin(oldest_here);
        }
        Ok(self.safe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_is_safe_only_once_every_older_transaction_ended() {
        let mut horizon = Horizon::new();
        horizon.propose(10, 500);
        assert_eq!(horizon.observe_xmin(499), 0);
        assert_eq!(horizon.observe_xmin(500), 10);
        assert!(!horizon.has_candidates());
    }

    #[test]
    fn candidates_become_safe_in_order_and_the_horizon_never_moves_back() {
        let mut horizon = Horizon::new();
        horizon.propose(10, 500);
        horizon.propose(20, 510);
        horizon.propose(30, 520);
        assert_eq!(horizon.observe_xmin(515), 20);
        assert_eq!(horizon.observe_xmin(400), 20);
        assert_eq!(horizon.observe_xmin(520), 30);
    }

    #[test]
    fn a_cursor_already_known_is_not_proposed_again() {
        let mut horizon = Horizon::new();
        horizon.propose(10, 500);
        horizon.propose(10, 600);
        assert_eq!(horizon.observe_xmin(500), 10);
        horizon.propose(10, 700);
        assert!(!horizon.has_candidates());
    }

    #[test]
    fn only_a_candidate_that_waited_long_enough_asks_about_this_database() {
        let start = Instant::now();
        let mut horizon = Horizon::new();
        assert!(!horizon.oldest_waited(Duration::ZERO, start));
        horizon.propose_at(10, 500, start);
        horizon.propose_at(20, 510, start + Duration::from_millis(40));
        assert!(!horizon.oldest_waited(LOCAL_CHECK_AFTER, start + Duration::from_millis(49)));
        assert!(horizon.oldest_waited(LOCAL_CHECK_AFTER, start + LOCAL_CHECK_AFTER));
        // The oldest is gone: the next one's own wait counts.
        horizon.observe_xmin(500);
        assert!(!horizon.oldest_waited(LOCAL_CHECK_AFTER, start + LOCAL_CHECK_AFTER));
        assert!(horizon.oldest_waited(
            LOCAL_CHECK_AFTER,
            start + Duration::from_millis(40) + LOCAL_CHECK_AFTER
        ));
    }

    #[test]
    fn too_many_candidates_keep_the_newest_conservatively() {
        let mut horizon = Horizon::new();
        for i in 1..=(MAX_CANDIDATES as i64 + 10) {
            horizon.propose(i, 1000 + i);
        }
        assert_eq!(horizon.candidates.len(), MAX_CANDIDATES);
        let newest = MAX_CANDIDATES as i64 + 10;
        assert_eq!(
            horizon.observe_xmin(1000 + newest - 1),
            MAX_CANDIDATES as i64 - 1
        );
        assert_eq!(horizon.observe_xmin(1000 + newest), newest);
    }
}
