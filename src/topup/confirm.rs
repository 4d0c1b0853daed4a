//! ConfirmTopUp and expiry: finishing a top-up that waits for the customer
//! (3-D Secure at charge time), through the same settle step as every other
//! answer, so the ledger is credited exactly once whichever of ConfirmTopUp,
//! the processor's webhook and the reconciler is first.

use uuid::Uuid;

use chrono::Datelike;

use super::pipeline::{
    Answer, ChargeRefused, Lease, TopUps, card_refusal, gate_refusal, lock_account,
};
use super::{AttemptOutcome, TopUpStatus, Trigger, gateway_key, store};
use crate::audit;
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::gateway::{Charge, GatewayError, Outcome};
use crate::ids::AccountId;

impl TopUps {
    /// Completes the challenge of a `REQUIRES_ACTION` top-up of `account`
    /// (any trigger): passed → charged on-session with the same attempt's
    /// key and settled; failed → `FAILED` with `authentication_failed`.
    /// Confirming again answers the same result and charges nothing.
    ///
    /// Errors: `NotFound` (no such top-up of the account), `FailedPrecondition`
    /// (not waiting for authentication, naming its status; a passed answer
    /// the live state refuses: the card, the gate, an automatic top-up no
    /// longer wanted — see `take_confirmation`), `Unavailable` (the
    /// processor did not answer; retry).
    #[tracing::instrument(name = "top_up.confirm", skip_all, fields(account_id = %account, top_up_id))]
    pub async fn confirm_top_up(
        &self,
        caller: &Caller,
        account: &AccountId,
        top_up_id: &str,
        authenticated: bool,
    ) -> Result<super::FundsResult, BillingError> {
        // A taken confirmation's charge runs to its end and is settled even
        // when the caller goes away mid-charge (as Add Funds').
        let this = self.clone();
        let caller = caller.clone();
        let account = account.clone();
        let top_up_id = top_up_id.to_owned();
        crate::tasks::run_to_end("confirming a top-up", async move {
            this.confirm_to_the_end(&caller, &account, &top_up_id, authenticated)
                .await
        })
        .await
    }

    async fn confirm_to_the_end(
        &self,
        caller: &Caller,
        account: &AccountId,
        top_up_id: &str,
        authenticated: bool,
    ) -> Result<super::FundsResult, BillingError> {
        let mut snapshot = store::snapshot(&self.pool).await?;
        let top_up = store::get(&mut snapshot, account, top_up_id).await?;
        snapshot.commit().await?;
        let waiting = top_up
            .attempts
            .iter()
            .rev()
            .find(|a| a.outcome == AttemptOutcome::RequiresAction && a.challenge.is_some());
        let Some(waiting) = waiting else {
            let challenged = |a: &&super::TopUpAttempt| a.challenge.is_some();
            let settled = top_up
                .attempts
                .iter()
                .filter(challenged)
                .any(|a| a.outcome != AttemptOutcome::RequiresAction);
            let in_flight = top_up
                .attempts
                .iter()
                .filter(challenged)
                .any(|a| a.outcome == AttemptOutcome::Unknown);
            // Settled, or another confirmation's charge is in flight: the
            // top-up is answered as it stands; nothing is charged again.
            if settled && (top_up.status.is_final() || in_flight) {
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
        // The attempt is taken under the account lock before the gateway
        // hears of the answer, so two answers (passed and failed, or a
        // replay) never both act; a passed one moves money and meets the
        // rules of every charge made now (see `take_confirmation`).
        let lease = match self
            .take_confirmation(account, top_up_id, number, authenticated)
            .await?
        {
            Taken::Charge(lease) => lease,
            Taken::Elsewhere => return self.result(account, top_up_id).await,
            Taken::Refused(error) => return Err(error),
        };
        let charge = match self.gateway.confirm_charge(&key, authenticated).await {
            Ok(charge) => charge,
            Err(error) => {
                self.confirmation_not_answered(&lease, number, &error)
                    .await?;
                return Err(confirmation_error(top_up_id, error));
            }
        };
        // Settled whatever the answer: a challenge still open waits again,
        // a processing charge is reconciled by its key.
        let answered = !matches!(
            charge.outcome,
            Outcome::RequiresAction { .. } | Outcome::Unknown
        );
        self.settle(&lease, number, charge, Answer::Confirmed)
            .await?;
        if answered {
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

    /// Takes attempt `number` of a `REQUIRES_ACTION` top-up for the
    /// customer's answer, in one transaction under the account lock; taken
    /// elsewhere (another answer, a replay) or ended meanwhile, nothing is
    /// done. A passed challenge is a charge made now, so it meets the rules
    /// every charge meets when it is made, not when the challenge was asked:
    ///
    /// - the attempt's card can still be charged ([`card_refusal`], the rule
    ///   of Add Funds and Retry): else the top-up ends `FAILED`
    ///   (`payment_method_removed`, `payment_method_not_active`,
    ///   `expired_card`) and an automatic one's crossing starts the next
    ///   top-up on the other cards;
    /// - the gate is open (no other charge of the account has an unknown
    ///   outcome): else refused, the top-up still waiting;
    /// - an automatic top-up is still wanted ([`TopUps::still_wanted`]:
    ///   auto refill on, the balance below the threshold): else `CANCELED`.
    ///
    /// Taken, the attempt is `UNKNOWN` and the top-up `PENDING` under this
    /// confirmation's lease before the gateway hears of it: a card removal
    /// or a settings change meanwhile sees a charge in flight (as for any
    /// charge), the expiry of waiting top-ups leaves it alone, and if this
    /// process dies the engine reconciles it by its key once the lease runs
    /// out.
    async fn take_confirmation(
        &self,
        account: &AccountId,
        top_up_id: &str,
        number: i32,
        authenticated: bool,
    ) -> Result<Taken, BillingError> {
        let now = self.clock.now();
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, account).await?;
        let top_up = store::lock(&mut transaction, account, top_up_id).await?;
        let waiting = top_up
            .attempts
            .iter()
            .find(|a| a.attempt_number == number && a.outcome == AttemptOutcome::RequiresAction);
        let Some(waiting) = waiting.filter(|_| top_up.status == TopUpStatus::RequiresAction) else {
            transaction.commit().await?;
            return Ok(Taken::Elsewhere);
        };
        if authenticated
            && let Some(refused) = self
                .refuse_charge(&mut transaction, &top_up, &waiting.payment_method_id, now)
                .await?
        {
            transaction.commit().await?;
            if let ChargeRefused::Card {
                started_next: true, ..
            } = refused
            {
                self.wake.notify_one();
            }
            return Ok(Taken::Refused(refusal_error(top_up_id, refused)));
        }
        let owner = Uuid::new_v4();
        sqlx::query(
            "UPDATE top_up_attempts SET outcome = 'UNKNOWN' WHERE top_up_id = $1 AND attempt_number = $2",
        )
        .bind(top_up_id)
        .bind(number)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "UPDATE top_ups SET status = 'PENDING', failure_reason = '', lease_owner = $2, lease_until = $3, \
                    updated_at = $4 WHERE top_up_id = $1",
        )
        .bind(top_up_id)
        .bind(owner)
        .bind(now + self.config.lease)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Taken::Charge(Lease {
            top_up_id: top_up_id.to_owned(),
            account: account.clone(),
            owner,
        }))
    }

    /// The gateway did not answer a taken confirmation. Refused (it charged
    /// nothing): the attempt waits for the customer again. No answer at all:
    /// the outcome is unknown and the charge is reconciled by its key.
    async fn confirmation_not_answered(
        &self,
        lease: &Lease,
        number: i32,
        error: &GatewayError,
    ) -> Result<(), BillingError> {
        if let GatewayError::Unexpected(_) = error {
            let unknown = Charge {
                charge_id: None,
                outcome: Outcome::Unknown,
            };
            self.settle(lease, number, unknown, Answer::Confirmed)
                .await?;
            return Ok(());
        }
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, &lease.account).await?;
        let released = sqlx::query(
            "UPDATE top_ups SET status = 'REQUIRES_ACTION', failure_reason = 'authentication_required', lease_owner = NULL, lease_until = NULL \
              WHERE top_up_id = $1 AND lease_owner = $2 AND status = 'PENDING'",
        )
        .bind(&lease.top_up_id)
        .bind(lease.owner)
        .execute(&mut *transaction)
        .await?;
        if released.rows_affected() == 1 {
            sqlx::query(
                "UPDATE top_up_attempts SET outcome = 'REQUIRES_ACTION' \
                  WHERE top_up_id = $1 AND attempt_number = $2 AND outcome = 'UNKNOWN'",
            )
            .bind(&lease.top_up_id)
            .bind(number)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// `REQUIRES_ACTION` top-ups that can no longer be completed end
    /// `FAILED`: the customer did not answer in time
    /// (`authentication_expired`), or the card the challenge is for can no
    /// longer be charged — removed, no longer active or expired
    /// ([`card_refusal`]: `payment_method_removed`,
    /// `payment_method_not_active`, `expired_card`). An automatic one frees
    /// its crossing, and the account's next top-up (on the other cards) is
    /// decided in the same transaction, under the account lock: there is
    /// no moment, and no failure between two steps, in which the account is
    /// below its threshold with auto refill on and nothing open — nor one
    /// in which it waits for a challenge nobody can answer any more.
    pub(super) async fn expire_waiting(&self) -> Result<usize, BillingError> {
        let now = self.clock.now();
        let cutoff = now - self.config.action_expiry;
        let month = now.year() * 12 + now.month() as i32;
        let due: Vec<(String, String)> = sqlx::query_as(
            "SELECT t.top_up_id, t.account_id FROM top_ups t \
              WHERE t.status = 'REQUIRES_ACTION' \
                AND (t.updated_at <= $1 \
                     OR EXISTS (SELECT 1 FROM top_up_attempts a \
                                  JOIN payment_methods m ON m.payment_method_id = a.payment_method_id \
                                 WHERE a.top_up_id = t.top_up_id AND a.outcome = 'REQUIRES_ACTION' \
                                   AND (m.status NOT IN ('ACTIVE', 'TEMPORARILY_DISABLED') \
                                        OR m.exp_year * 12 + m.exp_month < $2))) \
              ORDER BY t.updated_at LIMIT 100",
        )
        .bind(cutoff)
        .bind(month)
        .fetch_all(&self.pool)
        .await?;
        let mut ended = 0;
        for (top_up_id, account_id) in &due {
            if self.end_waiting(top_up_id, account_id, cutoff).await? {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Ends one waiting top-up if, read again under the account lock, it
    /// still cannot be completed; true when it did.
    async fn end_waiting(
        &self,
        top_up_id: &str,
        account_id: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, BillingError> {
        let account = AccountId::parse(account_id)?;
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, &account).await?;
        let top_up = store::lock(&mut transaction, &account, top_up_id).await?;
        let expired: bool =
            sqlx::query_scalar("SELECT updated_at <= $2 FROM top_ups WHERE top_up_id = $1")
                .bind(top_up_id)
                .bind(cutoff)
                .fetch_one(&mut *transaction)
                .await?;
        let waiting = top_up
            .attempts
            .iter()
            .rev()
            .find(|a| a.outcome == AttemptOutcome::RequiresAction);
        let reason = match waiting {
            _ if top_up.status != TopUpStatus::RequiresAction => None,
            _ if expired => Some("authentication_expired"),
            Some(waiting) => {
                let card = crate::payment_methods::find_method(
                    &mut transaction,
                    &account,
                    &waiting.payment_method_id,
                )
                .await?;
                card_refusal(&card, self.clock.now())
            }
            None => None,
        };
        let Some(reason) = reason else {
            transaction.rollback().await?;
            return Ok(false);
        };
        self.finish(
            &mut transaction,
            &top_up,
            TopUpStatus::Failed,
            reason,
            None,
            None,
        )
        .await?;
        let started = top_up.trigger == Trigger::Automatic
            && self
                .recheck_locked(&mut transaction, account_id, true)
                .await?
                .is_some();
        transaction.commit().await?;
        tracing::info!(
            account_id,
            top_up_id,
            reason,
            next_top_up_started = started,
            "top-up waiting for authentication ended"
        );
        if started {
            self.wake.notify_one();
        }
        Ok(true)
    }
}

/// What the customer is told when a passed challenge may not be charged now.
fn refusal_error(top_up_id: &str, refused: ChargeRefused) -> BillingError {
    match refused {
        ChargeRefused::Gate { other } => gate_refusal(&other),
        ChargeRefused::Card {
            failure,
            payment_method_id,
            ..
        } => {
            let reason = match failure {
                "payment_method_removed" => Reason::PaymentMethodRemoved,
                "expired_card" => Reason::CardExpired,
                _ => Reason::PaymentMethodNotActive,
            };
            BillingError::precondition(
                reason,
                format!("payment_methods/{payment_method_id}"),
                format!(
                    "the card of this top-up cannot be charged ({failure}): top-up {top_up_id} ended FAILED and nothing was charged"
                ),
            )
        }
        ChargeRefused::NotWanted => not_awaiting_authentication(top_up_id, TopUpStatus::Canceled),
    }
}

/// What a confirmation found when it took the attempt.
enum Taken {
    /// Taken: charge it under this lease.
    Charge(Lease),
    /// Another confirmation took it, or it settled meanwhile.
    Elsewhere,
    /// The live state refuses the charge; the top-up has ended.
    Refused(BillingError),
}

/// The answer to a confirmation the gateway did not answer.
fn confirmation_error(top_up_id: &str, error: GatewayError) -> BillingError {
    match error {
        GatewayError::Rejected(reason) => BillingError::precondition(
            Reason::GatewayRejected,
            format!("top_ups/{top_up_id}"),
            format!("the payment gateway refused the confirmation: {reason}"),
        ),
        GatewayError::UnknownToken => BillingError::precondition(
            Reason::CardUnknownToGateway,
            format!("top_ups/{top_up_id}"),
            "the card of this top-up is no longer known to the payment gateway",
        ),
        GatewayError::Unexpected(cause) => {
            tracing::error!(error = ?cause, "payment gateway failed");
            BillingError::unavailable(
                Reason::GatewayUnavailable,
                "the payment gateway is unavailable; retry later",
            )
        }
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
