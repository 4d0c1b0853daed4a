//! The decisions taken on each balance event, in the event's batch
//! transaction (so each is taken exactly once, whatever the replicas):
//! first the low-balance alert and the depleted alert, then the top-up.
//! An alert's crossing is read off the event itself — the total balance
//! before it was at or above the threshold, after it is below. The top-up's
//! crossing is the account's crossing state (see `crossing`), shared with
//! "Apply Changes" and the chain of top-ups. Charging happens later, outside
//! the transaction (see `pipeline`).

use std::collections::HashMap;
use std::sync::Arc;

use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::Clock;
use super::crossing::{self, Ensured, Observed};
use super::settings::{self, LowBalanceSettings, PolicyConfig};
use crate::error::BillingError;
use crate::events::BalanceEvent;
use crate::money::Currency;
use crate::notifications::{self, Notice};
use crate::telemetry::links::{self, Cause};
use crate::telemetry::metrics;

pub struct PolicyDecider {
    pub config: PolicyConfig,
    pub clock: Arc<dyn Clock>,
}

impl PolicyDecider {
    /// The settings of the accounts of a batch of events, in one round trip
    /// (read once per batch: the decisions below never change them).
    pub async fn settings_of(
        &self,
        connection: &mut PgConnection,
        events: &[BalanceEvent],
    ) -> Result<HashMap<String, LowBalanceSettings>, BillingError> {
        let mut accounts: Vec<(&str, Currency)> = events
            .iter()
            .map(|event| (event.account_id.as_str(), event.currency))
            .collect();
        accounts.sort_unstable_by(|a, b| a.0.cmp(b.0));
        accounts.dedup_by(|a, b| a.0 == b.0);
        settings::load_many(connection, &accounts, &self.config).await
    }

    /// Returns the id of the automatic top-up it started, if any (to be
    /// driven once the batch commits). `settings`: the event's account's,
    /// from [`PolicyDecider::settings_of`].
    #[tracing::instrument(name = "engine.decide", skip_all, fields(account_id = %event.account_id, cursor = event.cursor))]
    pub async fn decide(
        &self,
        connection: &mut PgConnection,
        event: &BalanceEvent,
        settings: &LowBalanceSettings,
    ) -> Result<Option<String>, BillingError> {
        // A root span of its own: linked to the call that wrote the event.
        links::link_to(&Cause::Transaction(event.transaction_id));
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
        // The crossing state follows each account's events in order; an
        // event older than the state's own view (set by Apply, the chain or
        // the engine on the live balance) changes nothing.
        let observed = Observed {
            total: after,
            as_of: event.sequence,
        };
        if settings.auto_refill_enabled
            && crossing::may_change(&mut *connection, settings, observed).await?
        {
            // The crossing state follows the account's events in order, under
            // the account row lock; the charge itself decides on live state.
            sqlx::query("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
                .bind(&event.account_id)
                .execute(&mut *connection)
                .await?;
            let ensured = crossing::ensure_top_up(
                connection,
                settings,
                observed,
                false,
                &self.config,
                self.clock.as_ref(),
            )
            .await?;
            if let Ensured::Started(top_up_id) = &ensured {
                links::remember(Cause::TopUp(top_up_id.clone()));
            }
            return Ok(match ensured {
                Ensured::Started(top_up_id) => Some(top_up_id),
                _ => None,
            });
        }
        Ok(None)
    }
}
