//! ConfirmTopUp and expiry: finishing a top-up that waits for the customer
//! (3-D Secure at charge time), through the same settle step as every other
//! answer, so the ledger is credited exactly once whichever of ConfirmTopUp,
//! the processor's webhook and the reconciler is first.

use uuid::Uuid;

use super::pipeline::{Answer, Lease, TopUps, lock_account};
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
    /// `FAILED` with `authentication_expired`. An automatic one frees its
    /// crossing, and the account's next top-up (possibly on other cards)
    /// is decided in the same transaction, under the account lock: there is
    /// no moment, and no failure between two steps, in which the account is
    /// below its threshold with auto refill on and nothing open.
    pub(super) async fn expire_waiting(&self) -> Result<usize, BillingError> {
        let cutoff = self.clock.now() - self.config.action_expiry;
        let due: Vec<(String, String)> = sqlx::query_as(
            "SELECT top_up_id, account_id FROM top_ups \
              WHERE status = 'REQUIRES_ACTION' AND updated_at <= $1 \
              ORDER BY updated_at LIMIT 100",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut expired = 0;
        for (top_up_id, account_id) in &due {
            if self.expire_one(top_up_id, account_id, cutoff).await? {
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Expires one top-up if it still waits since before `cutoff`; true when
    /// it did.
    async fn expire_one(
        &self,
        top_up_id: &str,
        account_id: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, BillingError> {
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, &AccountId::parse(account_id)?).await?;
        let trigger: Option<String> = sqlx::query_scalar(
            "UPDATE top_ups SET status = 'FAILED', failure_reason = 'authentication_expired', \
                    updated_at = $3, lease_until = NULL, lease_owner = NULL \
              WHERE top_up_id = $1 AND status = 'REQUIRES_ACTION' AND updated_at <= $2 \
          RETURNING trigger",
        )
        .bind(top_up_id)
        .bind(cutoff)
        .bind(self.clock.now())
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(trigger) = trigger else {
            transaction.rollback().await?;
            return Ok(false);
        };
        audit::record(
            &mut transaction,
            &super::engine_caller(),
            "finish_top_up",
            Some(account_id),
            serde_json::json!({
                "top_up_id": top_up_id,
                "status": TopUpStatus::Failed.as_str(),
                "trigger": trigger,
                "reason": "authentication_expired",
            }),
        )
        .await?;
        let started = Trigger::parse(&trigger) == Some(Trigger::Automatic)
            && self
                .recheck_locked(&mut transaction, account_id, true)
                .await?
                .is_some();
        transaction.commit().await?;
        crate::telemetry::metrics::top_up_finished(TopUpStatus::Failed.as_str());
        tracing::info!(
            account_id,
            top_up_id,
            next_top_up_started = started,
            "top-up waiting for authentication expired"
        );
        if started {
            self.wake.notify_one();
        }
        Ok(true)
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
