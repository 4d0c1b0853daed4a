//! The top-up reactor: the shortest path from a crossing to its first
//! charge, in the process that can act on it.
//!
//! Through the database alone a crossing travels: the debit's commit → the
//! event horizon → the balance-policy subscriber's batch, which starts the
//! top-up → a wake-up of the engine → the engine's scan for due top-ups →
//! the charge. The reactor takes two shortcuts, both in memory:
//!
//! - the debit batcher hands it every account whose total balance a
//!   committed batch took below its auto-refill threshold
//!   ([`crate::ledger::DebitBatcher::with_crossings`]); the reactor decides
//!   at once, on the live state under the account lock (the decision "Apply
//!   Changes" and the cap-window resumption take, [`TopUps::decide_crossing`]),
//!   and drives the top-up it started;
//! - the balance-policy subscriber hands it the top-ups its batches started
//!   (crossings committed by other replicas, or nudges dropped here), which
//!   it drives at once instead of waking the engine's next pass.
//!
//! Correctness stays in the database, as everywhere else: the crossing state,
//! changed only under the account lock, lets one top-up start per crossing
//! whoever decides first (this reactor, the subscriber on any replica,
//! Apply); the lease, taken by id ([`TopUps::claim`]), lets one driver charge
//! it; and whatever the reactor drops (a full channel, a failure, a crash) is
//! still a `PENDING` top-up in the table that the engine's pass claims.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::TopUps;
use crate::error::BillingError;
use crate::ids::AccountId;
use crate::telemetry::links::{self, Cause};

/// Room in each of the reactor's channels; a nudge that finds them full is
/// dropped (the subscriber and the engine pick its work up).
pub const REACTOR_CHANNEL: usize = 1024;

/// Reactions (decision + charge) running at once.
const REACTIONS_AT_ONCE: usize = 8;

/// An automatic top-up just started and due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedTopUp {
    pub account_id: String,
    pub top_up_id: String,
}

/// What the reactor is asked to do.
enum Reaction {
    /// A debit took the account below its auto-refill threshold.
    Crossed(String),
    /// A top-up was started: drive it.
    Drive(StartedTopUp),
}

/// Reacts to crossings and started top-ups of this process (see the module header).
pub struct TopUpReactor {
    top_ups: TopUps,
}

impl TopUpReactor {
    pub fn new(top_ups: TopUps) -> Self {
        Self { top_ups }
    }

    /// Runs until `stop`, or until both channels are closed; then waits for
    /// the reactions under way (each ends as a drive by the engine would).
    pub async fn run(
        self,
        mut crossings: mpsc::Receiver<String>,
        mut started: mpsc::Receiver<StartedTopUp>,
        mut stop: watch::Receiver<bool>,
    ) {
        let room = Arc::new(Semaphore::new(REACTIONS_AT_ONCE));
        let mut running = JoinSet::new();
        loop {
            let reaction = tokio::select! {
                Some(account_id) = crossings.recv() => Reaction::Crossed(account_id),
                Some(top_up) = started.recv() => Reaction::Drive(top_up),
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
                if let Err(error) = react(&top_ups, reaction).await {
                    // The subscriber and the engine still have the work.
                    tracing::warn!(%error, "top-up reaction failed; the engine will pick it up");
                    top_ups.wake.notify_one();
                }
            });
        }
        while running.join_next().await.is_some() {}
    }
}

async fn react(top_ups: &TopUps, reaction: Reaction) -> Result<(), BillingError> {
    let started = match reaction {
        Reaction::Crossed(account_id) => match decide(top_ups, &account_id).await? {
            Some(top_up_id) => StartedTopUp {
                account_id,
                top_up_id,
            },
            // Nothing to start: not below any more, already handled, capped.
            None => return Ok(()),
        },
        Reaction::Drive(started) => started,
    };
    let account = AccountId::parse(&started.account_id)?;
    // `None`: another driver (the engine, another replica) holds it.
    if let Some(lease) = top_ups.claim(&account, &started.top_up_id).await? {
        top_ups.drive_and_release(&lease).await?;
    }
    Ok(())
}

/// The decision on a crossing: a root span of its own (as the
/// balance-policy subscriber's), linked to the debit that made the crossing;
/// the top-up it starts is linked to it in turn.
#[tracing::instrument(name = "engine.decide", parent = None, skip(top_ups), fields(reactor = true))]
async fn decide(top_ups: &TopUps, account_id: &str) -> Result<Option<String>, BillingError> {
    links::link_to(&Cause::Crossing(account_id.to_owned()));
    let started = top_ups.decide_crossing(account_id, false).await?;
    if let Some(top_up_id) = &started {
        links::remember(Cause::TopUp(top_up_id.clone()));
    }
    Ok(started)
}
