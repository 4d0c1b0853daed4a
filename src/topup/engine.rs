//! The auto top-up engine, run by every replica: it claims a due automatic
//! top-up with a lease (no transaction stays open during gateway calls),
//! then charges the account's auto-charge methods in priority order.
//!
//! - Every attempt is written (outcome `UNKNOWN`) before the gateway is
//!   called, with an idempotency key derived from the top-up and attempt
//!   number; so a crash, a timeout or a second replica can only ever ask
//!   the gateway about the same charge, never make a second one.
//! - An attempt still `UNKNOWN` is reconciled first with `find_charge`, and
//!   nothing else is charged for the account while any of its automatic
//!   top-ups is `UNKNOWN`.
//! - A decline disables the method for auto-charge (temporarily) and falls
//!   through to the next. When every method failed, the round is counted
//!   and the next one scheduled with back-off; soft-declined methods are
//!   tried again in later rounds, hard-declined ones never.
//! - The ledger is credited only on success, in the transaction that marks
//!   the top-up `SUCCEEDED`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::settings::PolicyConfig;
use super::{AttemptOutcome, Clock, TopUp, TopUpStatus, gateway_key, ledger_key};
use crate::auth::{Caller, Role};
use crate::error::BillingError;
use crate::gateway::{Charge, ChargeRequest, GatewayError, Outcome, PaymentGateway};
use crate::ids::{AccountId, IdempotencyKey};
use crate::ledger::{self, EntryKind, Posting};
use crate::notifications::{self, CardLabel, Notice};
use crate::payment_methods::{self, PaymentMethod};
use crate::telemetry::metrics;

pub struct TopUpEngine {
    pub pool: PgPool,
    pub gateway: Arc<dyn PaymentGateway>,
    pub clock: Arc<dyn Clock>,
    pub config: PolicyConfig,
    /// Woken when a decision started a top-up in this process.
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
}

/// The engine acts as a service of its own in the ledger and the audit log.
pub fn engine_caller() -> Caller {
    Caller {
        subject: "auto-top-up-engine".into(),
        account: None,
        roles: vec![Role::Service],
    }
}

/// This replica's hold on one top-up.
struct Lease {
    top_up_id: String,
    owner: Uuid,
}

enum Step {
    /// The top-up reached a state the engine leaves it in.
    Done,
    /// Try the next method of the round.
    Next,
}

impl TopUpEngine {
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut last_reminder_check: Option<DateTime<Utc>> = None;
        loop {
            if let Err(error) = self.run_due().await {
                tracing::warn!(%error, "top-up engine pass failed");
            }
            if let Err(error) = self.reconcile_abandoned_manual_top_ups().await {
                tracing::warn!(%error, "reconciling abandoned manual top-ups failed");
            }
            let now = self.clock.now();
            if last_reminder_check.is_none_or(|at| now - at > chrono::Duration::hours(1)) {
                if let Err(error) = self.remind_expiring_cards().await {
                    tracing::warn!(%error, "card expiry reminders failed");
                }
                last_reminder_check = Some(now);
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Drives every due automatic top-up once; returns how many.
    pub async fn run_due(&self) -> Result<usize, BillingError> {
        let mut driven = 0;
        while let Some((top_up_id, account_id, owner)) = self.claim().await? {
            let account = AccountId::parse(&account_id)?;
            let lease = Lease {
                top_up_id: top_up_id.clone(),
                owner,
            };
            if let Err(error) = self.drive(&account, &lease).await {
                tracing::warn!(%top_up_id, %error, "top-up not driven; it will be retried");
                self.release(&lease, Some(self.clock.now() + self.config.reconcile_after))
                    .await?;
            }
            driven += 1;
        }
        Ok(driven)
    }

    async fn claim(&self) -> Result<Option<(String, String, Uuid)>, BillingError> {
        let now = self.clock.now();
        let owner = Uuid::new_v4();
        let claimed: Option<(String, String, Uuid)> = sqlx::query_as(
            "UPDATE top_ups SET lease_until = $2, lease_owner = $3, \
                    status = CASE WHEN status = 'RETRY_SCHEDULED' THEN 'PENDING' ELSE status END \
              WHERE top_up_id = ( \
                    SELECT top_up_id FROM top_ups \
                     WHERE trigger = 'AUTOMATIC' AND status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN') \
                       AND COALESCE(next_attempt_at, created_at) <= $1 \
                       AND (lease_until IS NULL OR lease_until <= $1) \
                     ORDER BY COALESCE(next_attempt_at, created_at) \
                     LIMIT 1 FOR UPDATE SKIP LOCKED) \
          RETURNING top_up_id, account_id, lease_owner",
        )
        .bind(now)
        .bind(now + self.config.lease)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        Ok(claimed)
    }

    /// Ends this replica's hold; `next_attempt_at` when it should come back.
    async fn release(
        &self,
        lease: &Lease,
        next_attempt_at: Option<DateTime<Utc>>,
    ) -> Result<(), BillingError> {
        sqlx::query(
            "UPDATE top_ups SET lease_until = NULL, lease_owner = NULL, \
                    next_attempt_at = COALESCE($3, next_attempt_at) \
              WHERE top_up_id = $1 AND lease_owner = $2",
        )
        .bind(&lease.top_up_id)
        .bind(lease.owner)
        .bind(next_attempt_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Extends this replica's lease before a gateway call; false when another
    /// replica took the top-up over (or it ended) — then this one stops.
    async fn renew(&self, lease: &Lease) -> Result<bool, BillingError> {
        let renewed = sqlx::query(
            "UPDATE top_ups SET lease_until = $3 WHERE top_up_id = $1 AND lease_owner = $2 \
                AND status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN')",
        )
        .bind(&lease.top_up_id)
        .bind(lease.owner)
        .bind(self.clock.now() + self.config.lease)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Inside a settling transaction: locks the top-up and confirms this
    /// replica still drives it.
    async fn still_ours(
        &self,
        connection: &mut PgConnection,
        lease: &Lease,
    ) -> Result<bool, BillingError> {
        let row: Option<(Option<Uuid>, String)> = sqlx::query_as(
            "SELECT lease_owner, status FROM top_ups WHERE top_up_id = $1 FOR UPDATE",
        )
        .bind(&lease.top_up_id)
        .fetch_optional(connection)
        .await?;
        Ok(matches!(row, Some((Some(owner), status))
            if owner == lease.owner
                && matches!(status.as_str(), "PENDING" | "RETRY_SCHEDULED" | "UNKNOWN" | "REQUIRES_ACTION")))
    }

    #[tracing::instrument(name = "engine.drive_top_up", skip_all, fields(account_id = %account, top_up_id = %lease.top_up_id))]
    async fn drive(&self, account: &AccountId, lease: &Lease) -> Result<(), BillingError> {
        let top_up_id = lease.top_up_id.as_str();
        let mut connection = self.pool.acquire().await?;
        let top_up = super::get(&mut connection, account, top_up_id).await?;
        if top_up.status.is_final() {
            drop(connection);
            return self.release(lease, None).await;
        }
        // Nothing else is charged for the account while a charge's outcome is unknown.
        let other_unknown: Option<String> = sqlx::query_scalar(
            "SELECT top_up_id FROM top_ups WHERE account_id = $1 AND trigger = 'AUTOMATIC' \
                AND status = 'UNKNOWN' AND top_up_id <> $2 LIMIT 1",
        )
        .bind(account.as_str())
        .bind(top_up_id)
        .fetch_optional(&mut *connection)
        .await?;
        drop(connection);
        if other_unknown.is_some() {
            return self
                .release(lease, Some(self.clock.now() + self.config.reconcile_after))
                .await;
        }

        // An attempt left UNKNOWN (a timeout, or a crash mid-call) is settled first.
        if let Some(pending) = top_up
            .attempts
            .iter()
            .rev()
            .find(|a| a.outcome == AttemptOutcome::Unknown)
        {
            let method = self.method(account, &pending.payment_method_id).await?;
            let key = gateway_key(top_up_id, pending.attempt_number);
            if !self.renew(lease).await? {
                return Ok(());
            }
            let charge = match self.gateway.find_charge(&key).await {
                Ok(Some(charge)) => charge,
                // The processor never saw it: making it now, with the same key, is safe.
                Ok(None) => self.charge(&method, &top_up, key).await,
                Err(error) => {
                    tracing::warn!(%top_up_id, %error, "reconciliation failed; will ask again");
                    return self
                        .release(lease, Some(self.clock.now() + self.config.reconcile_after))
                        .await;
                }
            };
            if let Step::Done = self
                .settle(lease, &top_up, pending.attempt_number, &method, charge)
                .await?
            {
                return Ok(());
            }
        }

        let top_up = super::get(&mut *self.pool.acquire().await?, account, top_up_id).await?;
        let round = top_up.rounds;
        let candidates = self.candidates(account, &top_up).await?;
        for method in candidates {
            // Re-read: an earlier candidate of this round added attempts.
            let top_up = super::get(&mut *self.pool.acquire().await?, account, top_up_id).await?;
            let attempt_number = top_up
                .attempts
                .iter()
                .map(|a| a.attempt_number)
                .max()
                .unwrap_or(0)
                + 1;
            if !self.renew(lease).await? {
                return Ok(());
            }
            self.record_attempt_start(&top_up, attempt_number, round, &method)
                .await?;
            let charge = self
                .charge(&method, &top_up, gateway_key(top_up_id, attempt_number))
                .await;
            if let Step::Done = self
                .settle(lease, &top_up, attempt_number, &method, charge)
                .await?
            {
                return Ok(());
            }
        }
        self.finish_round(account, lease).await
    }

    /// A charge result that arrived on its own (a processor's webhook) for
    /// attempt `attempt_number` of an automatic top-up left `UNKNOWN` or
    /// `REQUIRES_ACTION`: settled as the gateway's answer would have been
    /// (credit and receipt, or decline and fall-through). The top-up is
    /// claimed with the engine's lease first, so a replica reconciling it at
    /// the same moment and this never both settle it. Returns false when there
    /// was nothing to settle (settled already, or being driven: the driving
    /// replica's reconciliation asks the gateway and finds the same result).
    pub async fn settle_reported(
        &self,
        top_up_id: &str,
        attempt_number: i32,
        charge: Charge,
    ) -> Result<bool, BillingError> {
        if charge.outcome == Outcome::Unknown {
            return Ok(false);
        }
        let now = self.clock.now();
        let owner = Uuid::new_v4();
        let claimed: Option<String> = sqlx::query_scalar(
            "UPDATE top_ups SET lease_until = $2, lease_owner = $4 \
              WHERE top_up_id = $1 AND trigger = 'AUTOMATIC' AND status IN ('UNKNOWN', 'REQUIRES_ACTION') \
                AND (lease_until IS NULL OR lease_until <= $3) \
          RETURNING account_id",
        )
        .bind(top_up_id)
        .bind(now + self.config.lease)
        .bind(now)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        let Some(account_id) = claimed else {
            return Ok(false);
        };
        let lease = Lease {
            top_up_id: top_up_id.to_owned(),
            owner,
        };
        let account = AccountId::parse(&account_id)?;
        let top_up = super::get(&mut *self.pool.acquire().await?, &account, top_up_id).await?;
        let Some(attempt) = top_up.attempts.iter().find(|a| {
            a.attempt_number == attempt_number
                && matches!(
                    a.outcome,
                    AttemptOutcome::Unknown | AttemptOutcome::RequiresAction
                )
        }) else {
            self.release(&lease, None).await?;
            return Ok(false);
        };
        let method = self.method(&account, &attempt.payment_method_id).await?;
        match self
            .settle(&lease, &top_up, attempt_number, &method, charge)
            .await
        {
            Ok(Step::Done) => {}
            Ok(Step::Next) => {
                // Declined after all: the engine goes on with the round's other methods.
                sqlx::query(
                    "UPDATE top_ups SET status = 'PENDING', next_attempt_at = $2, lease_until = NULL, \
                            lease_owner = NULL, updated_at = $2 WHERE top_up_id = $1",
                )
                .bind(top_up_id)
                .bind(now)
                .execute(&self.pool)
                .await?;
                self.wake.notify_one();
            }
            Err(error) => {
                self.release(&lease, None).await?;
                return Err(error);
            }
        }
        Ok(true)
    }

    /// Methods to try this round: active auto-charge ones in priority order,
    /// plus those this top-up disabled with a soft decline in earlier rounds;
    /// never one it hard-declined or already tried this round.
    async fn candidates(
        &self,
        account: &AccountId,
        top_up: &TopUp,
    ) -> Result<Vec<PaymentMethod>, BillingError> {
        let mut connection = self.pool.acquire().await?;
        let methods = payment_methods::auto_charge_methods(&mut connection, account).await?;
        let round_attempts: Vec<(String, i32, bool)> = sqlx::query_as(
            "SELECT payment_method_id, round, hard_decline FROM top_up_attempts WHERE top_up_id = $1",
        )
        .bind(&top_up.top_up_id)
        .fetch_all(&mut *connection)
        .await?;
        let tried = |id: &str, round: i32| {
            round_attempts
                .iter()
                .any(|(m, r, _)| m == id && *r == round)
        };
        let hard = |id: &str| round_attempts.iter().any(|(m, _, hard)| m == id && *hard);
        let soft_declined_here =
            |id: &str| round_attempts.iter().any(|(m, _, hard)| m == id && !*hard);
        Ok(methods
            .into_iter()
            .filter(|m| {
                let id = m.payment_method_id.as_str();
                let usable =
                    m.status == payment_methods::MethodStatus::Active || soft_declined_here(id);
                usable && !hard(id) && !tried(id, top_up.rounds)
            })
            .collect())
    }

    async fn method(
        &self,
        account: &AccountId,
        payment_method_id: &str,
    ) -> Result<PaymentMethod, BillingError> {
        let mut connection = self.pool.acquire().await?;
        let methods = payment_methods::auto_charge_methods(&mut connection, account).await?;
        match methods
            .into_iter()
            .find(|m| m.payment_method_id == payment_method_id)
        {
            Some(method) => Ok(method),
            None => payment_methods::find_method(&mut connection, account, payment_method_id).await,
        }
    }

    async fn record_attempt_start(
        &self,
        top_up: &TopUp,
        attempt_number: i32,
        round: i32,
        method: &PaymentMethod,
    ) -> Result<(), BillingError> {
        sqlx::query(
            "INSERT INTO top_up_attempts (top_up_id, attempt_number, payment_method_id, outcome, amount, \
                                          gateway_idempotency_key, round, attempted_at) \
             VALUES ($1, $2, $3, 'UNKNOWN', $4, $5, $6, $7)",
        )
        .bind(&top_up.top_up_id)
        .bind(attempt_number)
        .bind(&method.payment_method_id)
        .bind(top_up.amount)
        .bind(gateway_key(&top_up.top_up_id, attempt_number))
        .bind(round)
        .bind(self.clock.now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One off-session charge; transport failures are an unknown outcome.
    async fn charge(&self, method: &PaymentMethod, top_up: &TopUp, key: String) -> Charge {
        let request = ChargeRequest {
            token: method.gateway_token.clone(),
            amount: top_up.amount,
            currency: top_up.currency,
            idempotency_key: key,
            off_session: true,
        };
        match self.gateway.charge(request).await {
            Ok(charge) => charge,
            Err(GatewayError::UnknownToken) => Charge {
                charge_id: None,
                outcome: Outcome::Declined {
                    code: "card_not_found".into(),
                    hard: true,
                },
            },
            Err(GatewayError::Rejected(reason)) => {
                tracing::warn!(top_up_id = %top_up.top_up_id, %reason, "gateway refused the charge");
                Charge {
                    charge_id: None,
                    outcome: Outcome::Declined {
                        code: "gateway_rejected".into(),
                        hard: true,
                    },
                }
            }
            Err(GatewayError::Unexpected(error)) => {
                tracing::warn!(top_up_id = %top_up.top_up_id, error = %error, "gateway call failed; outcome unknown");
                Charge {
                    charge_id: None,
                    outcome: Outcome::Unknown,
                }
            }
        }
    }

    /// Records what the gateway answered for one attempt, and its consequences.
    async fn settle(
        &self,
        lease: &Lease,
        top_up: &TopUp,
        attempt_number: i32,
        method: &PaymentMethod,
        charge: Charge,
    ) -> Result<Step, BillingError> {
        let now = self.clock.now();
        let account = AccountId::parse(&top_up.account_id)?;
        let card = CardLabel {
            brand: method.brand.clone(),
            last4: method.last4.clone(),
        };
        let mut transaction = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
            .bind(account.as_str())
            .execute(&mut *transaction)
            .await?;
        if !self.still_ours(&mut transaction, lease).await? {
            // Another replica took over (this one was too slow): it settles the attempt.
            return Ok(Step::Done);
        }
        let (outcome, decline) = match &charge.outcome {
            Outcome::Succeeded => (AttemptOutcome::Succeeded, None),
            Outcome::Declined { code, hard } => {
                (AttemptOutcome::Declined, Some((code.as_str(), *hard)))
            }
            Outcome::RequiresAction { .. } => (AttemptOutcome::RequiresAction, None),
            Outcome::Unknown => (AttemptOutcome::Unknown, None),
        };
        let (decline_code, hard) = decline.unwrap_or(("", false));
        sqlx::query(
            "UPDATE top_up_attempts SET outcome = $3, decline_code = $4, hard_decline = $5, gateway_charge_id = $6 \
              WHERE top_up_id = $1 AND attempt_number = $2",
        )
        .bind(&top_up.top_up_id)
        .bind(attempt_number)
        .bind(outcome.as_str())
        .bind(decline_code)
        .bind(hard)
        .bind(charge.charge_id.as_deref())
        .execute(&mut *transaction)
        .await?;

        let step = match &charge.outcome {
            Outcome::Succeeded => {
                let posted = self
                    .credit(&mut transaction, &account, top_up, method)
                    .await?;
                payment_methods::restore_after_success(&mut transaction, method).await?;
                self.set_status(
                    &mut transaction,
                    top_up,
                    TopUpStatus::Succeeded,
                    "",
                    None,
                    Some(posted.entry.transaction_id),
                )
                .await?;
                let notice = Notice::TopUpReceipt {
                    top_up_id: top_up.top_up_id.clone(),
                    amount: top_up.amount,
                    card,
                    balance_after: posted.total_balance,
                };
                let key = format!("top_up_receipt:{}", top_up.top_up_id);
                notifications::enqueue(&mut transaction, account.as_str(), &notice, &key).await?;
                tracing::info!(account_id = %account, top_up_id = %top_up.top_up_id, amount = %top_up.amount, "automatic top-up succeeded");
                Step::Done
            }
            Outcome::Declined { code, hard } => {
                metrics::card_declined(code);
                tracing::info!(account_id = %account, top_up_id = %top_up.top_up_id, decline_code = %code, hard, "automatic charge declined");
                if payment_methods::disable_after_decline(&mut transaction, method, code).await? {
                    let notice = Notice::PaymentMethodDisabled {
                        card,
                        reason: code.clone(),
                    };
                    let key = format!(
                        "payment_method_disabled:{}:{}:{attempt_number}",
                        method.payment_method_id, top_up.top_up_id
                    );
                    notifications::enqueue(&mut transaction, account.as_str(), &notice, &key)
                        .await?;
                }
                Step::Next
            }
            Outcome::RequiresAction { .. } => {
                self.set_status(
                    &mut transaction,
                    top_up,
                    TopUpStatus::RequiresAction,
                    "authentication_required",
                    None,
                    None,
                )
                .await?;
                let notice = Notice::AuthenticationRequired {
                    top_up_id: top_up.top_up_id.clone(),
                    amount: top_up.amount,
                    card,
                };
                let key = format!("authentication_required:{}", top_up.top_up_id);
                notifications::enqueue(&mut transaction, account.as_str(), &notice, &key).await?;
                Step::Done
            }
            Outcome::Unknown => {
                let next = now + self.config.reconcile_after;
                self.set_status(
                    &mut transaction,
                    top_up,
                    TopUpStatus::Unknown,
                    "gateway_timeout",
                    Some(next),
                    None,
                )
                .await?;
                Step::Done
            }
        };
        transaction.commit().await?;
        Ok(step)
    }

    async fn credit(
        &self,
        connection: &mut PgConnection,
        account: &AccountId,
        top_up: &TopUp,
        method: &PaymentMethod,
    ) -> Result<ledger::PostingResult, BillingError> {
        let posting = Posting {
            account_id: account.clone(),
            kind: EntryKind::TopUp,
            amount: top_up.amount,
            idempotency_key: IdempotencyKey::parse(&ledger_key(&top_up.top_up_id))?,
            description: format!("automatic top-up, {} •••• {}", method.brand, method.last4),
            metadata: [
                ("top_up_id".to_owned(), top_up.top_up_id.clone()),
                (
                    "payment_method_id".to_owned(),
                    method.payment_method_id.clone(),
                ),
            ]
            .into(),
            allow_overdraft: false,
        };
        ledger::post_in_transaction(connection, &engine_caller(), &posting).await
    }

    async fn set_status(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
        status: TopUpStatus,
        reason: &str,
        next_attempt_at: Option<DateTime<Utc>>,
        transaction_id: Option<uuid::Uuid>,
    ) -> Result<(), BillingError> {
        sqlx::query(
            "UPDATE top_ups SET status = $2, failure_reason = $3, next_attempt_at = $4, \
                    transaction_id = COALESCE($5, transaction_id), lease_until = NULL, lease_owner = NULL, updated_at = $6 \
              WHERE top_up_id = $1",
        )
        .bind(&top_up.top_up_id)
        .bind(status.as_str())
        .bind(reason)
        .bind(next_attempt_at)
        .bind(transaction_id)
        .bind(self.clock.now())
        .execute(connection)
        .await?;
        metrics::top_up_finished(status.as_str());
        Ok(())
    }

    /// Every method of the round failed (or there was none): schedule the
    /// next round with back-off, or give up after the last.
    async fn finish_round(&self, account: &AccountId, lease: &Lease) -> Result<(), BillingError> {
        let top_up_id = lease.top_up_id.as_str();
        let now = self.clock.now();
        let mut transaction = self.pool.begin().await?;
        if !self.still_ours(&mut transaction, lease).await? {
            return Ok(());
        }
        let top_up = super::lock(&mut transaction, account, top_up_id).await?;
        let rounds = top_up.rounds + 1;
        let any_attempt = !top_up.attempts.is_empty();
        let reason = if any_attempt {
            "every payment method failed"
        } else {
            "no active payment method with auto-charge"
        };
        let last_round = rounds >= self.config.max_rounds;
        let next = (!last_round).then(|| {
            let index =
                (rounds as usize - 1).min(self.config.retry_backoff.len().saturating_sub(1));
            now + self
                .config
                .retry_backoff
                .get(index)
                .copied()
                .unwrap_or(chrono::Duration::hours(24))
        });
        let status = if last_round {
            TopUpStatus::Failed
        } else {
            TopUpStatus::RetryScheduled
        };
        sqlx::query("UPDATE top_ups SET rounds = $2 WHERE top_up_id = $1")
            .bind(top_up_id)
            .bind(rounds)
            .execute(&mut *transaction)
            .await?;
        self.set_status(&mut transaction, &top_up, status, reason, next, None)
            .await?;
        if last_round || rounds == 1 {
            let notice = Notice::TopUpFailed {
                top_up_id: top_up_id.to_owned(),
                amount: top_up.amount,
                reason: reason.to_owned(),
                next_attempt_at: next,
            };
            let key = format!(
                "top_up_failed:{top_up_id}:{}",
                if last_round {
                    "final".to_owned()
                } else {
                    rounds.to_string()
                }
            );
            notifications::enqueue(&mut transaction, account.as_str(), &notice, &key).await?;
        }
        transaction.commit().await?;
        tracing::info!(account_id = %account, top_up_id, rounds, status = status.as_str(), "top-up round failed");
        Ok(())
    }

    /// Manual and retry top-ups left `PENDING`/`UNKNOWN` longer than
    /// `abandoned_after` (their caller went away mid-request): asked about
    /// at the gateway and settled or closed, so no charge stays uncredited.
    pub async fn reconcile_abandoned_manual_top_ups(&self) -> Result<usize, BillingError> {
        let stale_before = self.clock.now() - self.config.abandoned_after;
        let stale: Vec<(String, String)> = sqlx::query_as(
            "SELECT top_up_id, account_id FROM top_ups \
              WHERE trigger IN ('MANUAL', 'RETRY') AND status IN ('PENDING', 'UNKNOWN') AND updated_at < $1 \
              ORDER BY updated_at LIMIT 20",
        )
        .bind(stale_before)
        .fetch_all(&self.pool)
        .await?;
        let methods = payment_methods::PaymentMethods::new(self.pool.clone(), self.gateway.clone());
        let mut closed = 0;
        for (top_up_id, account_id) in stale {
            let account = AccountId::parse(&account_id)?;
            if methods
                .reconcile_abandoned(&engine_caller(), &account, &top_up_id)
                .await?
            {
                closed += 1;
            }
        }
        Ok(closed)
    }

    /// "Card expiring": once per card, 30 days before the end of its expiry month.
    pub async fn remind_expiring_cards(&self) -> Result<usize, BillingError> {
        let today = self.clock.now().date_naive();
        let mut transaction = self.pool.begin().await?;
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
