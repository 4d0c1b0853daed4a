//! Add Funds and Retry: the manual triggers of the one charge path.
//!
//! Under the account lock, one transaction checks the client's idempotency
//! key, chooses and checks the card, records the top-up `PENDING` and
//! remembers the key; then the pipeline drives it on-session (see
//! `pipeline`). A replay of the same request drives (or waits for) the same
//! top-up and can never charge twice.

use rust_decimal::Decimal;

use super::pipeline::{Driver, REPLAY_WAIT, TopUps, gate_closed_by, gate_refusal};
use super::{TopUp, Trigger, store};
use crate::audit;
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::ids::{AccountId, IdempotencyKey};
use crate::ledger::{self, previous_response, remember_response};
use crate::payment_methods::{self, MethodStatus, PaymentMethod};

/// Add Funds (`Trigger::Manual`, the primary card when no method is named)
/// or Retry (`Trigger::Retry`, a method is required).
#[derive(Debug, Clone)]
pub struct FundsRequest {
    pub account_id: AccountId,
    pub trigger: Trigger,
    /// As sent; empty means the default (Retry only: the account's refill
    /// amount, or the currency's smallest refill when none is set).
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

impl TopUps {
    /// Add Funds or Retry: records the top-up (or finds the one this key
    /// started) and charges it on-session through the one charge path.
    #[tracing::instrument(
        name = "top_up.add_funds",
        skip_all,
        fields(account_id = %request.account_id, trigger = ?request.trigger)
    )]
    pub async fn add_funds(
        &self,
        caller: &Caller,
        request: FundsRequest,
    ) -> Result<FundsResult, BillingError> {
        // Once the top-up is recorded, its charge runs to its end and is
        // settled even when the caller goes away mid-charge: the gate opens
        // as soon as the processor answers, not `--top-up-abandoned-secs`
        // later.
        let this = self.clone();
        let caller = caller.clone();
        crate::tasks::run_to_end("adding funds", async move {
            this.add_funds_to_the_end(&caller, request).await
        })
        .await
    }

    async fn add_funds_to_the_end(
        &self,
        caller: &Caller,
        request: FundsRequest,
    ) -> Result<FundsResult, BillingError> {
        let account = request.account_id.clone();
        let top_up_id = self.start_manual(caller, &request).await?;
        let deadline = tokio::time::Instant::now() + REPLAY_WAIT;
        loop {
            if let Some(lease) = self.claim(&account, &top_up_id).await? {
                let driven = self.drive(&lease, Driver::Caller).await;
                self.release(&lease, None).await?;
                driven?;
                break;
            }
            // Settled, or a replay of the same request is driving it: wait for that.
            let top_up = store::get(&mut *self.pool.acquire().await?, &account, &top_up_id).await?;
            if top_up.status.is_final() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        self.result(&account, &top_up_id).await
    }

    /// Validates, then records the top-up (or finds the one this key started).
    async fn start_manual(
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
        let currency: String =
            sqlx::query_scalar("SELECT currency FROM accounts WHERE account_id = $1 FOR UPDATE")
                .bind(account.as_str())
                .fetch_optional(&mut *transaction)
                .await?
                .ok_or(BillingError::NotFound("account"))?;
        let currency = ledger::currency_from_column(&currency)?;
        let amount = if request.amount.is_empty() && request.trigger == Trigger::Retry {
            let settings =
                super::settings::load(&mut transaction, account.as_str(), &self.config).await?;
            let (min, _) = self.config.refill_bounds.of(currency);
            if settings.refill_amount > Decimal::ZERO {
                settings.refill_amount
            } else {
                min
            }
        } else {
            let amount = currency
                .parse_charge_amount(&request.amount)
                .map_err(|e| BillingError::invalid("amount", e.to_string()))?;
            // The largest single charge of every path: automatic top-ups
            // are bounded by it too (`--refill-max`).
            let (_, max) = self.config.refill_bounds.of(currency);
            if amount > max {
                return Err(BillingError::invalid_because(
                    Reason::RefillOutOfBounds,
                    "amount",
                    format!(
                        "must be at most {} (the largest single charge)",
                        currency.display(max)
                    ),
                ));
            }
            amount
        };
        let method_field = request.payment_method_id.as_deref().unwrap_or("");
        // "10" and "10.00" are the same request; an empty Retry amount stays
        // empty (its default follows the settings).
        let amount_field = if request.amount.is_empty() {
            String::new()
        } else {
            amount.normalize().to_string()
        };
        let fingerprint = ledger::request_fingerprint(operation, &[&amount_field, method_field]);
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

        let live = payment_methods::live_methods(&mut transaction, account).await?;
        let method = match &request.payment_method_id {
            Some(id) => match live.into_iter().find(|m| &m.payment_method_id == id) {
                Some(method) => method,
                None => {
                    // Removed ones are named as such; others' are not found.
                    let method =
                        payment_methods::find_method(&mut transaction, account, id).await?;
                    return Err(not_chargeable(&method));
                }
            },
            None => live.into_iter().find(|m| m.primary).ok_or_else(|| {
                BillingError::precondition(
                    Reason::NoPrimaryPaymentMethod,
                    format!("accounts/{account}"),
                    "the account has no primary payment method: add a card or name payment_method_id",
                )
            })?,
        };
        match method.status {
            MethodStatus::Active | MethodStatus::TemporarilyDisabled => {}
            MethodStatus::PendingAuthentication => {
                return Err(BillingError::precondition(
                    Reason::PaymentMethodPendingAuthentication,
                    format!("payment_methods/{}", method.payment_method_id),
                    "the payment method waits for 3-D Secure authentication (ConfirmCard) and cannot be charged yet",
                ));
            }
            MethodStatus::Failed | MethodStatus::Removed => {
                return Err(not_chargeable(&method));
            }
        }
        if let Some(other) = gate_closed_by(&mut transaction, account, "").await? {
            return Err(gate_refusal(&other));
        }
        let top_up = store::insert(
            &mut transaction,
            store::NewTopUp {
                account_id: account,
                trigger: request.trigger,
                amount,
                currency,
                payment_method_id: Some(&method.payment_method_id),
                crossing_key: None,
                now: self.clock.now(),
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
        audit::record_keyed(
            &mut transaction,
            caller,
            operation,
            Some(account.as_str()),
            Some(&request.idempotency_key),
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

    pub(super) async fn result(
        &self,
        account: &AccountId,
        top_up_id: &str,
    ) -> Result<FundsResult, BillingError> {
        // One snapshot: the top-up, its attempts, the card and the balance
        // as they stood together.
        let mut connection = store::snapshot(&self.pool).await?;
        let top_up = store::get(&mut connection, account, top_up_id).await?;
        let payment_method = match &top_up.payment_method_id {
            Some(id) => Some(payment_methods::find_method(&mut connection, account, id).await?),
            None => None,
        };
        let balance = ledger::load_account(&mut connection, account.as_str())
            .await?
            .balance;
        connection.commit().await?;
        Ok(FundsResult {
            top_up,
            payment_method,
            balance,
        })
    }
}

/// Why a removed or failed payment method cannot be charged.
fn not_chargeable(method: &PaymentMethod) -> BillingError {
    let reason = if method.status == MethodStatus::Removed {
        Reason::PaymentMethodRemoved
    } else {
        Reason::PaymentMethodNotActive
    };
    BillingError::precondition(
        reason,
        format!("payment_methods/{}", method.payment_method_id),
        format!(
            "the payment method is {} and cannot be charged; add the card again",
            method.status.as_str()
        ),
    )
}
