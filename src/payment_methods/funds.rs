//! Add Funds and retry: manual charges of one card that refill the balance.
//!
//! Two transactions around one gateway call:
//! 1. under the account lock: check the client's idempotency key, choose and
//!    check the card, record the top-up `PENDING` and remember the key;
//! 2. charge with the gateway key derived from the top-up (a replay of the
//!    same request re-drives the same top-up and can never charge twice);
//! 3. under the account lock again: record the attempt and, on success,
//!    credit the ledger in the transaction that marks the top-up `SUCCEEDED`.

use std::time::Instant;

use rust_decimal::Decimal;
use tracing::Instrument;

use super::{MethodStatus, PaymentMethod, PaymentMethods, gateway_error, store};
use crate::audit;
use crate::auth::Caller;
use crate::error::BillingError;
use crate::gateway::{Charge, ChargeRequest, Outcome};
use crate::ids::{AccountId, IdempotencyKey};
use crate::ledger::{self, EntryKind, Posting, previous_response, remember_response};
use crate::telemetry::metrics;
use crate::topup::{self, AttemptOutcome, NewTopUp, PendingChallenge, TopUp, TopUpStatus, Trigger};

/// Add Funds (`Trigger::Manual`, the primary card when no method is named)
/// or Retry (`Trigger::Retry`, a method is required).
#[derive(Debug, Clone)]
pub struct FundsRequest {
    pub account_id: AccountId,
    pub trigger: Trigger,
    /// As sent; empty means the default (retry only).
    pub amount: String,
    pub payment_method_id: Option<String>,
    pub idempotency_key: IdempotencyKey,
}

#[derive(Debug, Clone)]
pub struct FundsResult {
    pub top_up: TopUp,
    /// The method charged, as it is now.
    pub payment_method: Option<PaymentMethod>,
    pub balance: Decimal,
}

/// Manual charges carry exactly one attempt.
const ATTEMPT: i32 = 1;

impl PaymentMethods {
    #[tracing::instrument(
        name = "payment_methods.add_funds",
        skip_all,
        fields(account_id = %request.account_id, trigger = ?request.trigger)
    )]
    pub async fn add_funds(
        &self,
        caller: &Caller,
        request: FundsRequest,
    ) -> Result<FundsResult, BillingError> {
        let top_up_id = self.start_top_up(caller, &request).await?;
        self.drive(caller, &request.account_id, &top_up_id).await
    }

    /// Validates, then records the top-up (or finds the one this key started).
    async fn start_top_up(
        &self,
        caller: &Caller,
        request: &FundsRequest,
    ) -> Result<String, BillingError> {
        let operation = match request.trigger {
            Trigger::Retry => "retry_payment_method",
            _ => "add_funds",
        };
        let account = &request.account_id;
        let mut transaction = self.pool.begin().await?;
        let currency = store::lock_account(&mut transaction, account).await?;
        let amount = if request.amount.is_empty() && request.trigger == Trigger::Retry {
            Decimal::new(super::DEFAULT_RETRY_AMOUNT_MINOR_UNITS, 2)
        } else {
            currency
                .parse_charge_amount(&request.amount)
                .map_err(|e| BillingError::invalid("amount", e.to_string()))?
        };
        let method_field = request.payment_method_id.as_deref().unwrap_or("");
        let fingerprint = ledger::request_fingerprint(
            operation,
            &[&amount.normalize().to_string(), method_field],
        );
        let key = request.idempotency_key.as_str();
        if let Some(previous) = previous_response(
            &mut transaction,
            account.as_str(),
            key,
            operation,
            &fingerprint,
        )
        .await?
        {
            transaction.commit().await?;
            return Ok(previous["top_up_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned());
        }

        let method = match &request.payment_method_id {
            Some(id) => store::find_live(&mut transaction, account, id).await?,
            None => store::list_live(&mut transaction, account)
                .await?
                .into_iter()
                .find(|m| m.primary)
                .ok_or_else(|| {
                    BillingError::FailedPrecondition(
                        "the account has no primary payment method: add a card or name payment_method_id".into(),
                    )
                })?,
        };
        match method.status {
            MethodStatus::Active | MethodStatus::TemporarilyDisabled => {}
            MethodStatus::PendingAuthentication => {
                return Err(BillingError::FailedPrecondition(
                    "the payment method waits for 3-D Secure authentication (ConfirmCard) and cannot be charged yet".into(),
                ));
            }
            MethodStatus::Failed | MethodStatus::Removed => {
                return Err(BillingError::FailedPrecondition(format!(
                    "the payment method is {} and cannot be charged; add the card again",
                    method.status.as_str()
                )));
            }
        }
        let top_up = topup::insert(
            &mut transaction,
            NewTopUp {
                account_id: account,
                trigger: request.trigger,
                amount,
                currency,
                payment_method_id: Some(&method.payment_method_id),
                crossing_key: None,
            },
        )
        .await?;
        remember_response(
            &mut transaction,
            account.as_str(),
            key,
            operation,
            &fingerprint,
            serde_json::json!({ "top_up_id": top_up.top_up_id }),
        )
        .await?;
        audit::record(
            &mut transaction,
            caller,
            operation,
            Some(account.as_str()),
            serde_json::json!({
                "top_up_id": top_up.top_up_id,
                "payment_method_id": method.payment_method_id,
                "amount": currency.format(amount),
            }),
        )
        .await?;
        transaction.commit().await?;
        Ok(top_up.top_up_id)
    }

    /// Charges a started top-up and records the result; a top-up already
    /// settled is returned as it is, an unknown one is reconciled first.
    async fn drive(
        &self,
        caller: &Caller,
        account: &AccountId,
        top_up_id: &str,
    ) -> Result<FundsResult, BillingError> {
        let mut connection = self.pool.acquire().await?;
        let top_up = topup::get(&mut connection, account, top_up_id).await?;
        let method_id = top_up.payment_method_id.clone().unwrap_or_default();
        if top_up.status.is_final() {
            return self.result(account, top_up).await;
        }
        let method = store::find(&mut connection, account, &method_id).await?;
        drop(connection);

        let gateway_key = topup::gateway_key(top_up_id, ATTEMPT);
        let reconciled = if top_up.status == TopUpStatus::Unknown {
            self.gateway
                .find_charge(&gateway_key)
                .instrument(tracing::info_span!(
                    "gateway.find_charge",
                    gateway = self.gateway.name()
                ))
                .await
                .map_err(|e| gateway_error("payment_method_id", e))?
        } else {
            None
        };
        let charge = match reconciled {
            Some(charge) => charge,
            None => {
                let started = Instant::now();
                // The span names the gateway, never the token or the card.
                let charged = self
                    .gateway
                    .charge(ChargeRequest {
                        token: method.gateway_token.clone(),
                        amount: top_up.amount,
                        currency: top_up.currency,
                        idempotency_key: gateway_key,
                        off_session: false,
                    })
                    .instrument(tracing::info_span!(
                        "gateway.charge",
                        gateway = self.gateway.name()
                    ))
                    .await;
                metrics::gateway_charge_observed(started.elapsed().as_secs_f64());
                charged.map_err(|e| gateway_error("payment_method_id", e))?
            }
        };
        self.settle(caller, account, top_up_id, &method, charge, false)
            .await
    }

    async fn settle(
        &self,
        caller: &Caller,
        account: &AccountId,
        top_up_id: &str,
        method: &PaymentMethod,
        charge: Charge,
        reopen_requires_action: bool,
    ) -> Result<FundsResult, BillingError> {
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account).await?;
        let top_up = topup::lock(&mut transaction, account, top_up_id).await?;
        let reopened = reopen_requires_action && top_up.status == TopUpStatus::RequiresAction;
        if top_up.status.is_final() && !reopened {
            // A concurrent replay of the same request settled it first.
            transaction.commit().await?;
            return self.result(account, top_up).await;
        }
        let method_id = method.payment_method_id.as_str();
        let charge_id = charge.charge_id.as_deref();
        let (attempt, decline, status, reason, challenge) = match &charge.outcome {
            Outcome::Succeeded => (
                AttemptOutcome::Succeeded,
                None,
                TopUpStatus::Succeeded,
                "",
                None,
            ),
            Outcome::Declined { code, hard } => (
                AttemptOutcome::Declined,
                Some((code.as_str(), *hard)),
                TopUpStatus::Failed,
                code.as_str(),
                None,
            ),
            Outcome::RequiresAction { challenge } => (
                AttemptOutcome::RequiresAction,
                None,
                TopUpStatus::RequiresAction,
                "authentication_required",
                Some(PendingChallenge {
                    challenge_id: challenge.challenge_id.clone(),
                    redirect_url: challenge.redirect_url.clone(),
                }),
            ),
            Outcome::Unknown => (
                AttemptOutcome::Unknown,
                None,
                TopUpStatus::Unknown,
                "gateway_timeout",
                None,
            ),
        };
        topup::record_attempt(
            &mut transaction,
            top_up_id,
            ATTEMPT,
            method_id,
            attempt,
            decline,
            top_up.amount,
            charge_id,
        )
        .await?;
        let mut transaction_id = None;
        if status == TopUpStatus::Succeeded {
            let posting = Posting {
                account_id: account.clone(),
                kind: EntryKind::TopUp,
                amount: top_up.amount,
                idempotency_key: IdempotencyKey::parse(&topup::ledger_key(top_up_id))?,
                description: format!(
                    "{} top-up, {} •••• {}",
                    trigger_label(top_up.trigger),
                    method.brand,
                    method.last4
                ),
                metadata: [
                    ("top_up_id".to_owned(), top_up_id.to_owned()),
                    ("payment_method_id".to_owned(), method_id.to_owned()),
                ]
                .into(),
                allow_overdraft: false,
            };
            let posted = ledger::post_in_transaction(&mut transaction, caller, &posting).await?;
            transaction_id = Some(posted.entry.transaction_id);
            self.restore_after_success(&mut transaction, account, method_id, top_up.trigger)
                .await?;
        }
        topup::finish(
            &mut transaction,
            top_up_id,
            status,
            transaction_id,
            reason,
            challenge.as_ref(),
        )
        .await?;
        audit::record(
            &mut transaction,
            caller,
            "top_up_settled",
            Some(account.as_str()),
            serde_json::json!({ "top_up_id": top_up_id, "status": status.as_str(), "decline_code": decline.map(|d| d.0) }),
        )
        .await?;
        transaction.commit().await?;
        metrics::top_up_finished(status.as_str());
        if let Some((code, _)) = decline {
            metrics::card_declined(code);
        }
        tracing::info!(account_id = %account, top_up_id, status = status.as_str(), "top-up settled");
        let top_up = topup::get(&mut *self.pool.acquire().await?, account, top_up_id).await?;
        self.result(account, top_up).await
    }

    /// A charge result that arrived on its own (a processor's webhook) for a
    /// manual or retry top-up left `UNKNOWN` or `REQUIRES_ACTION` (the
    /// customer finished 3-D Secure in the browser): settled through the same
    /// path as a synchronous answer, so the ledger is credited exactly once.
    /// Returns false when there was nothing to settle.
    pub async fn settle_reported(
        &self,
        caller: &Caller,
        account: &AccountId,
        top_up_id: &str,
        attempt_number: i32,
        charge: Charge,
    ) -> Result<bool, BillingError> {
        if attempt_number != ATTEMPT || charge.outcome == Outcome::Unknown {
            return Ok(false);
        }
        let mut connection = self.pool.acquire().await?;
        let top_up = topup::get(&mut connection, account, top_up_id).await?;
        // PENDING: the Add Funds call is still waiting for its own answer.
        if !matches!(
            top_up.status,
            TopUpStatus::Unknown | TopUpStatus::RequiresAction
        ) {
            return Ok(false);
        }
        let method_id = top_up.payment_method_id.clone().unwrap_or_default();
        let method = store::find(&mut connection, account, &method_id).await?;
        drop(connection);
        self.settle(caller, account, top_up_id, &method, charge, true)
            .await?;
        Ok(true)
    }

    /// A manual or retry top-up whose caller went away before it was settled
    /// (a crash between recording it and recording the charge, and no retry
    /// of the request since): the gateway is asked about its one attempt.
    /// A charge it knows is settled as usual; one it never saw means nothing
    /// was charged, and the top-up is closed as `FAILED`. Returns true when
    /// the top-up was closed.
    pub async fn reconcile_abandoned(
        &self,
        caller: &Caller,
        account: &AccountId,
        top_up_id: &str,
    ) -> Result<bool, BillingError> {
        let mut connection = self.pool.acquire().await?;
        let top_up = topup::get(&mut connection, account, top_up_id).await?;
        if !matches!(top_up.status, TopUpStatus::Pending | TopUpStatus::Unknown) {
            return Ok(false);
        }
        let method_id = top_up.payment_method_id.clone().unwrap_or_default();
        let method = store::find(&mut connection, account, &method_id).await?;
        drop(connection);
        let key = topup::gateway_key(top_up_id, ATTEMPT);
        let found = self
            .gateway
            .find_charge(&key)
            .await
            .map_err(|e| gateway_error("payment_method_id", e))?;
        match found {
            Some(charge) if charge.outcome != Outcome::Unknown => {
                self.settle(caller, account, top_up_id, &method, charge, false)
                    .await?;
            }
            Some(_) => return Ok(false),
            None => {
                let mut transaction = self.pool.begin().await?;
                store::lock_account(&mut transaction, account).await?;
                let locked = topup::lock(&mut transaction, account, top_up_id).await?;
                if !matches!(locked.status, TopUpStatus::Pending | TopUpStatus::Unknown) {
                    return Ok(false);
                }
                topup::finish(
                    &mut transaction,
                    top_up_id,
                    TopUpStatus::Failed,
                    None,
                    "abandoned: the request was not completed and nothing was charged",
                    None,
                )
                .await?;
                audit::record(
                    &mut transaction,
                    caller,
                    "top_up_abandoned",
                    Some(account.as_str()),
                    serde_json::json!({ "top_up_id": top_up_id }),
                )
                .await?;
                transaction.commit().await?;
                tracing::warn!(account_id = %account, top_up_id, "abandoned manual top-up closed; nothing was charged");
            }
        }
        Ok(true)
    }

    /// A successful manual charge restores a temporarily disabled method;
    /// a successful retry also turns its auto-charge back on.
    async fn restore_after_success(
        &self,
        connection: &mut sqlx::PgConnection,
        account: &AccountId,
        method_id: &str,
        trigger: Trigger,
    ) -> Result<(), BillingError> {
        let method = store::find(&mut *connection, account, method_id).await?;
        let restore = method.status == MethodStatus::TemporarilyDisabled;
        let auto_charge = method.auto_charge || trigger == Trigger::Retry;
        if restore || auto_charge != method.auto_charge {
            let status = if restore {
                MethodStatus::Active
            } else {
                method.status
            };
            store::update_state(connection, method_id, status, auto_charge, "").await?;
        }
        Ok(())
    }

    async fn result(
        &self,
        account: &AccountId,
        top_up: TopUp,
    ) -> Result<FundsResult, BillingError> {
        let mut connection = self.pool.acquire().await?;
        let payment_method = match &top_up.payment_method_id {
            Some(id) => Some(store::find(&mut connection, account, id).await?),
            None => None,
        };
        let balance = ledger::get_account(&self.pool, account).await?.balance;
        Ok(FundsResult {
            top_up,
            payment_method,
            balance,
        })
    }
}

fn trigger_label(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Automatic => "automatic",
        Trigger::Manual => "manual",
        Trigger::Retry => "retry",
    }
}
