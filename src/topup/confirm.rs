//! ConfirmTopUp and expiry: finishing a top-up that waits for the customer
//! (3-D Secure at charge time), through the same settle step as every other
//! answer, so the ledger is credited exactly once whichever of ConfirmTopUp,
//! the processor's webhook and the reconciler is first.

use uuid::Uuid;

use super::pipeline::{Answer, Lease, TopUps};
use super::{AttemptOutcome, TopUpStatus, Trigger, gateway_key, store};
use crate::audit;
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::gateway::{GatewayError, Outcome};
use crate::ids::AccountId;

impl TopUps {
    /// Completes the challenge of a `REQUIRES_ACTION` top-up of `account`
    /// (any trigger): passed → charged on-session with the same attempt's
    /// key and settled; failed → `FAILED` with `authentication_failed`.
    /// Confirming again answers the same result and charges nothing.
    ///
    /// Errors: `NotFound` (no such top-up of the account), `FailedPrecondition`
    /// (not waiting for authentication; names its status), `Unavailable`
    /// (the processor did not answer; retry).
    #[tracing::instrument(name = "top_up.confirm", skip_all, fields(account_id = %account, top_up_id))]
    pub async fn confirm_top_up(
        &self,
        caller: &Caller,
        account: &AccountId,
        top_up_id: &str,
        authenticated: bool,
    ) -> Result<super::FundsResult, BillingError> {
        let top_up = store::get(&mut *self.pool.acquire().await?, account, top_up_id).await?;
        let waiting = top_up
            .attempts
            .iter()
            .rev()
            .find(|a| a.outcome == AttemptOutcome::RequiresAction && a.challenge.is_some());
        let Some(waiting) = waiting else {
            let challenged_and_settled = top_up
                .attempts
                .iter()
                .any(|a| a.challenge.is_some() && a.outcome != AttemptOutcome::RequiresAction);
            if challenged_and_settled && top_up.status.is_final() {
                return self.result(account, top_up_id).await;
            }
            return Err(not_awaiting_authentication(top_up_id, top_up.status));
        };
        if !matches!(
            top_up.status,
            TopUpStatus::RequiresAction | TopUpStatus::Failed
        ) {
            return Err(not_awaiting_authentication(top_up_id, top_up.status));
        }
        let number = waiting.attempt_number;
        let key = gateway_key(top_up_id, number);
        let charge = match self.gateway.confirm_charge(&key, authenticated).await {
            Ok(charge) => charge,
            Err(GatewayError::Rejected(reason)) => {
                return Err(BillingError::precondition(
                    Reason::GatewayRejected,
                    format!("top_ups/{top_up_id}"),
                    format!("the payment gateway refused the confirmation: {reason}"),
                ));
            }
            Err(GatewayError::UnknownToken) => {
                return Err(BillingError::precondition(
                    Reason::CardUnknownToGateway,
                    format!("top_ups/{top_up_id}"),
                    "the card of this top-up is no longer known to the payment gateway",
                ));
            }
            Err(GatewayError::Unexpected(cause)) => {
                tracing::error!(error = ?cause, "payment gateway failed");
                return Err(BillingError::unavailable(
                    Reason::GatewayUnavailable,
                    "the payment gateway is unavailable; retry later",
                ));
            }
        };
        // Still waiting (the customer has not finished in the browser) or
        // processing: the top-up is answered as it is.
        if !matches!(
            charge.outcome,
            Outcome::RequiresAction { .. } | Outcome::Unknown
        ) {
            let lease = Lease {
                top_up_id: top_up_id.to_owned(),
                account: account.clone(),
                owner: Uuid::new_v4(),
            };
            self.settle(&lease, number, charge, Answer::Confirmed)
                .await?;
            let mut connection = self.pool.acquire().await?;
            audit::record(
                &mut connection,
                caller,
                "confirm_top_up",
                Some(account.as_str()),
                serde_json::json!({ "top_up_id": top_up_id, "authenticated": authenticated }),
            )
            .await?;
        }
        self.result(account, top_up_id).await
    }

    /// `REQUIRES_ACTION` top-ups the customer did not complete in time end
    /// `FAILED` with `authentication_expired`; an automatic one frees its
    /// crossing, so the account's next top-up (possibly on other cards)
    /// starts at once when it is still below its threshold.
    pub(super) async fn expire_waiting(&self) -> Result<usize, BillingError> {
        let now = self.clock.now();
        let expired: Vec<(String, String, String)> = sqlx::query_as(
            "UPDATE top_ups SET status = 'FAILED', failure_reason = 'authentication_expired', \
                    updated_at = $2, lease_until = NULL, lease_owner = NULL \
              WHERE status = 'REQUIRES_ACTION' AND updated_at <= $1 \
          RETURNING top_up_id, account_id, trigger",
        )
        .bind(now - self.config.action_expiry)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for (top_up_id, account_id, trigger) in &expired {
            crate::telemetry::metrics::top_up_finished(TopUpStatus::Failed.as_str());
            tracing::info!(
                account_id,
                top_up_id,
                "top-up waiting for authentication expired"
            );
            if Trigger::parse(trigger) != Some(Trigger::Automatic) {
                continue;
            }
            self.recheck_crossing(account_id, true).await?;
        }
        Ok(expired.len())
    }
}

/// ConfirmTopUp of a top-up that is not waiting for 3-D Secure.
fn not_awaiting_authentication(top_up_id: &str, status: TopUpStatus) -> BillingError {
    BillingError::precondition(
        Reason::NotAwaitingAuthentication,
        format!("top_ups/{top_up_id}"),
        format!(
            "the top-up is {}, not waiting for authentication",
            status.as_str()
        ),
    )
}
