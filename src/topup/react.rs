//! The top-up reactor: the shortest path from a started automatic top-up
//! to its first charge, in the process that started it.
//!
//! Through the database alone a crossing travels: the debit's commit → the
//! event horizon → the balance-policy subscriber's batch, which starts the
//! top-up → a wake-up of the engine → the engine's scan for due top-ups →
//! the charge. The subscriber hands the reactor the top-ups its batches
//! started instead, in memory, and the reactor drives each at once: no
//! wake-up, no scan.
//!
//! The debit batch does not hand its crossings to the reactor: the
//! subscriber enqueues the low-balance email in the transaction that starts
//! the top-up, and a charge started ahead of it sent the receipt first.
//!
//! Correctness stays in the database, as everywhere else: the crossing
//! state, changed only under the account lock, lets one top-up start per
//! crossing whoever decides first (the subscriber on any replica, Apply);
//! the lease, taken by id ([`TopUps::claim`]), lets one driver charge it;
//! and whatever the reactor drops (a full channel, a failure, a crash) is
//! still a `PENDING` top-up in the table that the engine's pass claims.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::TopUps;
use crate::error::BillingError;
use crate::ids::AccountId;

/// Room in the reactor's channel; a started top-up that finds it full is
/// left to the engine's next pass (the subscriber wakes it).
pub const REACTOR_CHANNEL: usize = 1024;

/// Top-ups driven at once.
const REACTIONS_AT_ONCE: usize = 8;

/// An automatic top-up just started and due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedTopUp {
    pub account_id: String,
    pub top_up_id: String,
}

/// Drives the top-ups this process's subscriber started (see the module header).
pub struct TopUpReactor {
    top_ups: TopUps,
}

impl TopUpReactor {
    pub fn new(top_ups: TopUps) -> Self {
        Self { top_ups }
    }

    /// Runs until `stop`, or until the channel is closed; then waits for
    /// the reactions under way (each ends as a drive by the engine would).
    pub async fn run(
        self,
        mut started: mpsc::Receiver<StartedTopUp>,
        mut stop: watch::Receiver<bool>,
    ) {
        let room = Arc::new(Semaphore::new(REACTIONS_AT_ONCE));
        let mut running = JoinSet::new();
        loop {
            let top_up = tokio::select! {
                Some(top_up) = started.recv() => top_up,
                _ = stop.wait_for(|stopped| *stopped) => break,
                else => break,
            };
            // Reap the reactions that ended.
            while running.try_join_next().is_some() {}
            let Ok(permit) = room.clone().acquire_owned().await else {
                break;
            };
            let top_ups = self.top_ups.clone();
            running.spawn(async move {
                let _permit = permit;
                if let Err(error) = drive(&top_ups, top_up).await {
                    // The subscriber and the engine still have the work.
                    tracing::warn!(%error, "top-up reaction failed; the engine will pick it up");
                    top_ups.wake.notify_one();
                }
            });
        }
        while running.join_next().await.is_some() {}
    }
}

async fn drive(top_ups: &TopUps, started: StartedTopUp) -> Result<(), BillingError> {
    let account = AccountId::parse(&started.account_id)?;
    // `None`: another driver (the engine, another replica) holds it.
    if let Some(lease) = top_ups.claim(&account, &started.top_up_id).await? {
        top_ups.drive_and_release(&lease).await?;
    }
    Ok(())
}
