//! The decisions taken on each balance event, in the event's batch
//! transaction (so each is taken exactly once, whatever the replicas):
//! first the low-balance alert and the depleted alert, then the top-up.
//! A crossing is read off the event itself — the total balance before it
//! was at or above the threshold, after it is below — so "one per crossing"
//! and "re-armed only when it rises back" need no extra state.
//! Charging happens later, outside the transaction (see `engine`).

use std::sync::Arc;

use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::settings::{self, LowBalanceSettings, PolicyConfig};
use super::{Clock, TopUpStatus, new_top_up_id};
use crate::error::BillingError;
use crate::events::BalanceEvent;
use crate::notifications::{self, Notice};
use crate::telemetry::metrics;

pub struct PolicyDecider {
    pub config: PolicyConfig,
    pub clock: Arc<dyn Clock>,
}

impl PolicyDecider {
    /// Returns true when a top-up was started (the engine should wake up).
    #[tracing::instrument(name = "engine.decide", skip_all, fields(account_id = %event.account_id, cursor = event.cursor))]
    pub async fn decide(
        &self,
        connection: &mut PgConnection,
        event: &BalanceEvent,
    ) -> Result<bool, BillingError> {
        let settings = settings::load(&mut *connection, &event.account_id, &self.config).await?;
        let after = event.total_balance_after;
        let before = after - event.amount;
        let crossed = |threshold: Decimal| before >= threshold && after < threshold;

        if settings.notification_enabled && crossed(settings.notification_threshold) {
            let notice = Notice::LowBalance {
                total_balance: after,
                threshold: settings.notification_threshold,
                auto_refill: settings
                    .auto_refill_enabled
                    .then_some(settings.refill_amount),
            };
            let key = format!("low_balance:{}:{}", event.account_id, event.cursor);
            notifications::enqueue(&mut *connection, &event.account_id, &notice, &key).await?;
            metrics::engine_decision("alerts", "low_balance");
        }
        if before > Decimal::ZERO && after <= Decimal::ZERO {
            let notice = Notice::BalanceDepleted {
                total_balance: after,
            };
            let key = format!("balance_depleted:{}:{}", event.account_id, event.cursor);
            notifications::enqueue(&mut *connection, &event.account_id, &notice, &key).await?;
        }
        if settings.auto_refill_enabled && crossed(settings.threshold) {
            let key = format!("crossing:{}", event.cursor);
            metrics::engine_decision("top_up", "crossing");
            let started = start_automatic_top_up(
                connection,
                &settings,
                after,
                &key,
                &self.config,
                self.clock.as_ref(),
            )
            .await?;
            return Ok(started.is_some());
        }
        Ok(false)
    }
}

/// Records an automatic top-up for this crossing (the engine charges it),
/// unless one is already open for the account or a 24 h cap forbids it —
/// then a `CAP_REACHED` top-up is recorded and the customer told.
pub(super) async fn start_automatic_top_up(
    connection: &mut PgConnection,
    settings: &LowBalanceSettings,
    total_balance: Decimal,
    crossing_key: &str,
    config: &PolicyConfig,
    clock: &dyn Clock,
) -> Result<Option<String>, BillingError> {
    let account_id = settings.account_id.as_str();
    // Serializes with "Apply Changes" and the engine: one open top-up per account.
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
        .bind(account_id)
        .execute(&mut *connection)
        .await?;
    let open: Option<String> = sqlx::query_scalar(
        "SELECT top_up_id FROM top_ups WHERE account_id = $1 AND trigger = 'AUTOMATIC' \
            AND status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN') LIMIT 1",
    )
    .bind(account_id)
    .fetch_optional(&mut *connection)
    .await?;
    if open.is_some() {
        return Ok(None);
    }
    let now = clock.now();
    let (count, charged): (i64, Decimal) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM top_ups \
          WHERE account_id = $1 AND trigger = 'AUTOMATIC' AND created_at > $2 \
            AND status IN ('SUCCEEDED', 'PENDING', 'RETRY_SCHEDULED', 'UNKNOWN')",
    )
    .bind(account_id)
    .bind(now - chrono::Duration::hours(24))
    .fetch_one(&mut *connection)
    .await?;

    let refill = settings.refill_amount;
    let mut multiple = refill_multiple(settings.threshold, total_balance, refill);
    // One automatic charge never exceeds the largest refill amount allowed.
    let largest = (config.max_refill / refill).floor().max(Decimal::ONE);
    multiple = multiple.min(largest);
    let mut cap_reason = None;
    if count >= i64::from(settings.max_top_ups_per_day) {
        cap_reason = Some(format!(
            "at most {} automatic top-ups per 24 hours",
            settings.max_top_ups_per_day
        ));
    } else if let Some(cap) = settings.max_amount_per_day {
        let room = ((cap - charged) / refill).floor();
        if room < Decimal::ONE {
            cap_reason = Some(format!(
                "at most {} charged automatically per 24 hours",
                settings.currency.display(cap)
            ));
        } else {
            multiple = multiple.min(room);
        }
    }
    let amount = refill * multiple;
    let status = if cap_reason.is_some() {
        TopUpStatus::CapReached
    } else {
        TopUpStatus::Pending
    };
    let top_up_id = new_top_up_id();
    let inserted = sqlx::query(
        "INSERT INTO top_ups (top_up_id, account_id, trigger, status, amount, currency, crossing_key, \
                              failure_reason, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, 'AUTOMATIC', $3, $4, $5, $6, $7, $8, $8, $8) \
         ON CONFLICT (account_id, crossing_key) DO NOTHING",
    )
    .bind(&top_up_id)
    .bind(account_id)
    .bind(status.as_str())
    .bind(amount)
    .bind(settings.currency.code())
    .bind(crossing_key)
    .bind(cap_reason.as_deref().unwrap_or(""))
    .bind(now)
    .execute(&mut *connection)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(None);
    }
    if let Some(cap) = cap_reason {
        tracing::warn!(account_id, %top_up_id, %cap, "automatic top-up not charged: cap reached");
        let notice = Notice::TopUpCapReached { cap, total_balance };
        notifications::enqueue(
            connection,
            account_id,
            &notice,
            &format!("top_up_cap_reached:{top_up_id}"),
        )
        .await?;
        return Ok(None);
    }
    tracing::info!(account_id, %top_up_id, %amount, "automatic top-up started");
    Ok(Some(top_up_id))
}

/// The smallest multiple of `refill` that lifts `total_balance` to the
/// threshold or above (at least one).
pub fn refill_multiple(threshold: Decimal, total_balance: Decimal, refill: Decimal) -> Decimal {
    if refill <= Decimal::ZERO {
        return Decimal::ONE;
    }
    let missing = threshold - total_balance;
    (missing / refill).ceil().max(Decimal::ONE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    #[test]
    fn one_refill_when_it_is_enough() {
        assert_eq!(refill_multiple(d("10"), d("5"), d("50")), d("1"));
    }

    #[test]
    fn the_smallest_multiple_that_reaches_the_threshold() {
        assert_eq!(refill_multiple(d("100"), d("-45"), d("50")), d("3"));
        assert_eq!(refill_multiple(d("100"), d("0"), d("50")), d("2"));
        assert_eq!(refill_multiple(d("100"), d("0.01"), d("50")), d("2"));
    }
}
