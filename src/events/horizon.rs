//! The cursor horizon: the largest cursor below which no event can still
//! commit. See the module header of `events` for why each step is needed.

use std::collections::VecDeque;

use sqlx::PgPool;

/// Candidates waiting for their writers to finish; more than this and the
/// newest replaces the last (a later candidate is only ever more conservative).
const MAX_CANDIDATES: usize = 64;

/// A cursor that becomes safe once every transaction id below `xid` has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    cursor: i64,
    xid: i64,
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
        if cursor <= self.newest_known() {
            return;
        }
        debug_assert!(
            self.candidates.back().is_none_or(|c| c.xid <= xid),
            "transaction ids only grow"
        );
        let candidate = Candidate { cursor, xid };
        if self.candidates.len() >= MAX_CANDIDATES {
            if let Some(last) = self.candidates.back_mut() {
                *last = candidate;
            }
        } else {
            self.candidates.push_back(candidate);
        }
    }

    /// Step 3: a snapshot's `xmin` (no transaction below it still runs).
    /// Returns the new safe cursor.
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
