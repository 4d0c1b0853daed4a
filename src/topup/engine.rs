//! The top-up engine, run by every replica. Each pass it
//! - claims due top-ups with a lease (`FOR UPDATE SKIP LOCKED`; no
//!   transaction stays open during gateway calls) and drives them through
//!   the one charge path (`pipeline`): automatic ones that are due (one
//!   that waited for another charge's unknown outcome is due as soon as
//!   that outcome is known), any top-up whose outcome is `UNKNOWN`
//!   (reconciled by idempotency key), and manual ones whose process died
//!   mid-charge;
//! - resumes crossings a cap stopped, once the rolling window allows;
//! - ends top-ups that waited for 3-D Secure too long (`authentication_expired`);
//! - once an hour, queues card-expiry reminders.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use super::pipeline::{Driver, Lease, TopUps};
use crate::auth::Caller;
use crate::error::BillingError;
use crate::ids::AccountId;
use crate::notifications::{self, CardLabel, Notice};
use crate::payment_methods;

pub struct TopUpEngine {
    pub top_ups: TopUps,
    pub poll_interval: Duration,
}

/// The engine acts as a service of its own in the ledger and the audit log.
pub fn engine_caller() -> Caller {
    Caller::engine("auto-top-up-engine")
}

impl TopUpEngine {
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut last_reminder_check: Option<DateTime<Utc>> = None;
        loop {
            if let Err(error) = self.run_due().await {
                tracing::warn!(%error, "top-up engine pass failed");
            }
            if let Err(error) = self.resume_capped_crossings().await {
                tracing::warn!(%error, "resuming capped crossings failed");
            }
            if let Err(error) = self.top_ups.expire_waiting().await {
                tracing::warn!(%error, "expiring top-ups waiting for authentication failed");
            }
            let now = self.top_ups.clock.now();
            if last_reminder_check.is_none_or(|at| now - at > chrono::Duration::hours(1)) {
                if let Err(error) = self.remind_expiring_cards().await {
                    tracing::warn!(%error, "card expiry reminders failed");
                }
                last_reminder_check = Some(now);
            }
            tokio::select! {
                _ = self.top_ups.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn pool(&self) -> &PgPool {
        &self.top_ups.pool
    }

    /// Drives every due top-up once; returns how many.
    pub async fn run_due(&self) -> Result<usize, BillingError> {
        let mut driven = 0;
        while let Some(lease) = self.claim_due().await? {
            self.top_ups.drive_and_release(&lease).await?;
            driven += 1;
        }
        Ok(driven)
    }

    async fn claim_due(&self) -> Result<Option<Lease>, BillingError> {
        let config = &self.top_ups.config;
        let now = self.top_ups.clock.now();
        let owner = Uuid::new_v4();
        let claimed: Option<(String, String)> = sqlx::query_as(
            "UPDATE top_ups SET lease_until = $2, lease_owner = $3, waits_for = NULL, \
                    status = CASE WHEN status = 'RETRY_SCHEDULED' THEN 'PENDING' ELSE status END, \
                    reconcile_tries = reconcile_tries + CASE WHEN status = 'UNKNOWN' THEN 1 ELSE 0 END \
              WHERE top_up_id = ( \
                    SELECT top_up_id FROM top_ups \
                     WHERE status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN') \
                       AND ((trigger = 'AUTOMATIC' AND COALESCE(next_attempt_at, created_at) <= $1) \
                         OR (trigger = 'AUTOMATIC' AND status = 'PENDING' AND waits_for IS NOT NULL \
                             AND NOT top_up_outcome_unknown(waits_for)) \
                         OR (trigger <> 'AUTOMATIC' AND status = 'UNKNOWN' AND COALESCE(next_attempt_at, updated_at) <= $1) \
                         OR (trigger <> 'AUTOMATIC' AND status = 'PENDING' AND updated_at <= $4)) \
                       AND (lease_until IS NULL OR lease_until <= $1) \
                     ORDER BY COALESCE(next_attempt_at, created_at) \
                     LIMIT 1 FOR UPDATE SKIP LOCKED) \
          RETURNING top_up_id, account_id",
        )
        .bind(now)
        .bind(now + config.lease)
        .bind(owner)
        .bind(now - config.abandoned_after)
        .fetch_optional(self.pool())
        .await?;
        claimed
            .map(|(top_up_id, account_id)| {
                Ok(Lease {
                    top_up_id,
                    account: AccountId::parse(&account_id)?,
                    owner,
                })
            })
            .transpose()
    }

    /// Crossings a cap stopped whose window now allows another top-up.
    pub async fn resume_capped_crossings(&self) -> Result<usize, BillingError> {
        let now = self.top_ups.clock.now();
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT account_id FROM top_up_crossings WHERE state = 'BELOW' AND resume_at <= $1 \
              ORDER BY resume_at LIMIT 50",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        let mut started = 0;
        for account_id in due {
            if self.top_ups.recheck_crossing(&account_id, false).await? {
                started += 1;
            }
        }
        Ok(started)
    }

    /// "Card expiring": once per card, 30 days before the end of its expiry month.
    pub async fn remind_expiring_cards(&self) -> Result<usize, BillingError> {
        let today = self.top_ups.clock.now().date_naive();
        let mut transaction = self.pool().begin().await?;
        let cards = payment_methods::cards_expiring_soon(&mut transaction, today, 30).await?;
        for (account_id, method) in &cards {
            sqlx::query("INSERT INTO card_expiry_reminders (payment_method_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(&method.payment_method_id)
                .execute(&mut *transaction)
                .await?;
            let notice = Notice::CardExpiring {
                card: CardLabel {
                    brand: method.brand.clone(),
                    last4: method.last4.clone(),
                },
                exp_month: method.exp_month.max(0) as u32,
                exp_year: method.exp_year,
            };
            let key = format!(
                "card_expiring:{}:{}-{}",
                method.payment_method_id, method.exp_year, method.exp_month
            );
            notifications::enqueue(&mut transaction, account_id, &notice, &key).await?;
        }
        transaction.commit().await?;
        Ok(cards.len())
    }
}

impl TopUps {
    /// Drives a top-up the engine (or the reactor) holds the lease of, then
    /// gives the lease back; a top-up that could not be driven comes back
    /// after `reconcile_after`.
    pub(super) async fn drive_and_release(&self, lease: &Lease) -> Result<(), BillingError> {
        if let Err(error) = self.drive(lease, Driver::Engine).await {
            tracing::warn!(top_up_id = %lease.top_up_id, %error, "top-up not driven; it will be retried");
            self.release(lease, Some(self.clock.now() + self.config.reconcile_after))
                .await
        } else {
            self.release(lease, None).await
        }
    }
}
