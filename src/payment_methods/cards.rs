//! Saved cards: add (with 3-D Secure), confirm, auto-charge, order, remove.

use std::collections::HashSet;

use super::store::{self, NewMethod};
use super::{BillingAddress, MethodStatus, PaymentMethod, PaymentMethods, gateway_error};
use crate::audit;
use crate::auth::Caller;
use crate::error::BillingError;
use crate::gateway::{CardSource, Outcome};
use crate::ids::{AccountId, IdempotencyKey};
use crate::ledger::{previous_response, remember_response, request_fingerprint};
use crate::topup::PendingChallenge;

const ADD_CARD: &str = "add_card";

#[derive(Debug, Clone)]
pub struct NewCard {
    pub account_id: AccountId,
    pub source: CardSource,
    pub billing_address: BillingAddress,
    pub idempotency_key: IdempotencyKey,
}

impl NewCard {
    /// Identifies the request without the card number or CVC (only the salted fingerprint).
    fn fingerprint(&self) -> String {
        let (source, holder, expiry) = match &self.source {
            CardSource::Card(card) => (
                card.number.fingerprint(),
                card.holder_name.clone(),
                format!("{}/{}", card.expiry.month, card.expiry.year),
            ),
            CardSource::Token(token) => (format!("token:{token}"), String::new(), String::new()),
        };
        let a = &self.billing_address;
        request_fingerprint(
            ADD_CARD,
            &[
                &source,
                &holder,
                &expiry,
                &a.line1,
                &a.line2,
                &a.city,
                &a.postal_code,
                &a.state,
                &a.country,
            ],
        )
    }

    fn holder_name(&self) -> &str {
        match &self.source {
            CardSource::Card(card) => &card.holder_name,
            CardSource::Token(_) => "",
        }
    }
}

fn new_method_id() -> String {
    format!("pm_{}", uuid::Uuid::now_v7().simple())
}

impl PaymentMethods {
    /// Sets the card up at the gateway and saves it: `ACTIVE`, or
    /// `PENDING_AUTHENTICATION` with a challenge, or `FAILED` when the set-up
    /// was declined. The first live card of an account gets auto-charge.
    pub async fn add_card(
        &self,
        caller: &Caller,
        new: NewCard,
    ) -> Result<PaymentMethod, BillingError> {
        if matches!(new.source, CardSource::Card(_)) && !self.gateway.accepts_raw_cards() {
            return Err(BillingError::invalid(
                "card",
                format!(
                    "the {} gateway takes only a gateway_token from client-side tokenization (a pm_... PaymentMethod id); card numbers are never sent from this service",
                    self.gateway.name()
                ),
            ));
        }
        let request_fingerprint = new.fingerprint();
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, &new.account_id).await?;
        let key = new.idempotency_key.as_str();
        let account = new.account_id.as_str();
        if let Some(previous) = previous_response(
            &mut transaction,
            account,
            key,
            ADD_CARD,
            &request_fingerprint,
        )
        .await?
        {
            let id = previous["payment_method_id"].as_str().unwrap_or_default();
            let method = store::find(&mut transaction, &new.account_id, id).await?;
            transaction.commit().await?;
            return Ok(method);
        }

        let setup = self
            .gateway
            .setup_card(account, new.source.clone())
            .await
            .map_err(|e| gateway_error("gateway_token", e))?;
        if let Some(existing) =
            store::live_with_fingerprint(&mut transaction, &new.account_id, &setup.card.fingerprint)
                .await?
        {
            if let Err(error) = self.gateway.detach(&setup.card.token).await {
                tracing::warn!(%error, account_id = account, "detaching a duplicate card failed");
            }
            return Err(BillingError::AlreadyExists(format!(
                "this card is already saved on the account as {existing}"
            )));
        }
        let (status, disabled_reason, challenge) = match setup.outcome {
            Outcome::Succeeded => (MethodStatus::Active, String::new(), None),
            Outcome::RequiresAction { challenge } => (
                MethodStatus::PendingAuthentication,
                String::new(),
                Some(PendingChallenge {
                    challenge_id: challenge.challenge_id,
                    redirect_url: challenge.redirect_url,
                }),
            ),
            Outcome::Declined { code, .. } => (MethodStatus::Failed, code, None),
            Outcome::Unknown => {
                return Err(BillingError::Unavailable(
                    "the payment gateway did not answer; retry with the same idempotency_key"
                        .into(),
                ));
            }
        };
        // The first card to become ACTIVE on an account with no other ACTIVE
        // card is auto-charged (a card waiting for 3-D Secure decides when confirmed).
        let is_first = store::no_active_card(&mut transaction, &new.account_id, None).await?;
        let payment_method_id = new_method_id();
        store::insert(
            &mut transaction,
            NewMethod {
                payment_method_id: &payment_method_id,
                account_id: &new.account_id,
                status,
                card: &setup.card,
                holder_name: new.holder_name(),
                address: &new.billing_address,
                gateway: self.gateway.name(),
                // A card waiting for 3-D Secure shows the intention; confirming decides.
                auto_charge: is_first && status != MethodStatus::Failed,
                disabled_reason: &disabled_reason,
                challenge: challenge.as_ref(),
            },
        )
        .await?;
        remember_response(
            &mut transaction,
            account,
            key,
            ADD_CARD,
            &request_fingerprint,
            serde_json::json!({ "payment_method_id": payment_method_id }),
        )
        .await?;
        audit::record(
            &mut transaction,
            caller,
            ADD_CARD,
            Some(account),
            serde_json::json!({
                "payment_method_id": payment_method_id,
                "brand": setup.card.brand,
                "last4": setup.card.last4,
                "status": status.as_str(),
            }),
        )
        .await?;
        let method = store::find(&mut transaction, &new.account_id, &payment_method_id).await?;
        transaction.commit().await?;
        tracing::info!(
            account_id = account,
            payment_method_id,
            brand = %setup.card.brand,
            status = status.as_str(),
            "card added"
        );
        Ok(method)
    }

    /// Completes the 3-D Secure challenge: `ACTIVE` when passed, `FAILED` otherwise.
    /// Confirming again with the same result returns the method unchanged.
    pub async fn confirm_card(
        &self,
        caller: &Caller,
        account_id: &AccountId,
        payment_method_id: &str,
        authenticated: bool,
    ) -> Result<PaymentMethod, BillingError> {
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account_id).await?;
        let method = store::find_live(&mut transaction, account_id, payment_method_id).await?;
        match (method.status, authenticated) {
            (MethodStatus::PendingAuthentication, _) => {}
            (MethodStatus::Active, true) | (MethodStatus::Failed, false) => return Ok(method),
            _ => {
                return Err(BillingError::FailedPrecondition(format!(
                    "the payment method is {}, not waiting for authentication",
                    method.status.as_str()
                )));
            }
        }
        let outcome = self
            .gateway
            .confirm_setup(&method.gateway_token, authenticated)
            .await
            .map_err(|e| gateway_error("payment_method_id", e))?;
        let method = self
            .apply_authentication(&mut transaction, caller, account_id, &method, outcome)
            .await?;
        transaction.commit().await?;
        Ok(method)
    }

    /// A 3-D Secure result the processor reported itself (a webhook: the
    /// customer finished the challenge in the browser): the card saved with
    /// `gateway_token` becomes `ACTIVE` or `FAILED` exactly as ConfirmCard
    /// would make it. `None` when no card waits for it (already settled,
    /// or a card of another gateway).
    pub async fn settle_authentication(
        &self,
        caller: &Caller,
        gateway_token: &str,
        outcome: Outcome,
    ) -> Result<Option<PaymentMethod>, BillingError> {
        let mut connection = self.pool.acquire().await?;
        let Some((account, payment_method_id)) =
            store::pending_by_token(&mut connection, self.gateway.name(), gateway_token).await?
        else {
            return Ok(None);
        };
        drop(connection);
        let account_id = AccountId::parse(&account)?;
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, &account_id).await?;
        let method = store::find_live(&mut transaction, &account_id, &payment_method_id).await?;
        if method.status != MethodStatus::PendingAuthentication {
            return Ok(None);
        }
        let method = self
            .apply_authentication(&mut transaction, caller, &account_id, &method, outcome)
            .await?;
        transaction.commit().await?;
        Ok(Some(method))
    }

    /// The state a pending card reaches with the gateway's verdict; the caller holds the account lock.
    async fn apply_authentication(
        &self,
        connection: &mut sqlx::PgConnection,
        caller: &Caller,
        account_id: &AccountId,
        method: &PaymentMethod,
        outcome: Outcome,
    ) -> Result<PaymentMethod, BillingError> {
        let payment_method_id = method.payment_method_id.as_str();
        let (status, auto_charge, reason) = match outcome {
            // Auto-charge is decided when the card becomes ACTIVE: on only
            // when no other card of the account is ACTIVE.
            Outcome::Succeeded => {
                let first_active =
                    store::no_active_card(&mut *connection, account_id, Some(payment_method_id))
                        .await?;
                (MethodStatus::Active, first_active, String::new())
            }
            Outcome::Declined { code, .. } => (MethodStatus::Failed, false, code),
            Outcome::RequiresAction { .. } | Outcome::Unknown => {
                return Err(BillingError::Unavailable(
                    "the payment gateway did not complete the authentication; retry".into(),
                ));
            }
        };
        store::update_state(
            &mut *connection,
            payment_method_id,
            status,
            auto_charge,
            &reason,
        )
        .await?;
        audit::record(
            &mut *connection,
            caller,
            "confirm_card",
            Some(account_id.as_str()),
            serde_json::json!({ "payment_method_id": payment_method_id, "status": status.as_str() }),
        )
        .await?;
        store::find(connection, account_id, payment_method_id).await
    }

    pub async fn get(
        &self,
        account_id: &AccountId,
        payment_method_id: &str,
    ) -> Result<PaymentMethod, BillingError> {
        let mut connection = self.pool.acquire().await?;
        store::find(&mut connection, account_id, payment_method_id).await
    }

    /// Every method not removed, in charge-priority order, the primary marked.
    pub async fn list(&self, account_id: &AccountId) -> Result<Vec<PaymentMethod>, BillingError> {
        let mut connection = self.pool.acquire().await?;
        store::list_live(&mut connection, account_id).await
    }

    pub async fn set_auto_charge(
        &self,
        caller: &Caller,
        account_id: &AccountId,
        payment_method_id: &str,
        enabled: bool,
    ) -> Result<PaymentMethod, BillingError> {
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account_id).await?;
        let method = store::find_live(&mut transaction, account_id, payment_method_id).await?;
        if enabled && method.status == MethodStatus::Failed {
            return Err(BillingError::FailedPrecondition(
                "a payment method whose set-up failed cannot be charged; add the card again".into(),
            ));
        }
        store::update_state(
            &mut transaction,
            payment_method_id,
            method.status,
            enabled,
            &method.disabled_reason,
        )
        .await?;
        audit::record(
            &mut transaction,
            caller,
            "set_auto_charge",
            Some(account_id.as_str()),
            serde_json::json!({ "payment_method_id": payment_method_id, "enabled": enabled }),
        )
        .await?;
        let method = store::find(&mut transaction, account_id, payment_method_id).await?;
        transaction.commit().await?;
        Ok(method)
    }

    /// `ordered_ids` must name each of the account's methods (not removed) exactly once.
    pub async fn reorder(
        &self,
        caller: &Caller,
        account_id: &AccountId,
        ordered_ids: Vec<String>,
    ) -> Result<Vec<PaymentMethod>, BillingError> {
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account_id).await?;
        let live: HashSet<String> = store::list_live(&mut transaction, account_id)
            .await?
            .into_iter()
            .map(|m| m.payment_method_id)
            .collect();
        let requested: HashSet<&String> = ordered_ids.iter().collect();
        let is_permutation = requested.len() == ordered_ids.len()
            && ordered_ids.len() == live.len()
            && ordered_ids.iter().all(|id| live.contains(id));
        if !is_permutation {
            return Err(BillingError::invalid(
                "payment_method_ids",
                format!(
                    "must list each of the account's {} payment methods exactly once",
                    live.len()
                ),
            ));
        }
        store::set_priorities(&mut transaction, &ordered_ids).await?;
        audit::record(
            &mut transaction,
            caller,
            "reorder_payment_methods",
            Some(account_id.as_str()),
            serde_json::json!({ "payment_method_ids": ordered_ids }),
        )
        .await?;
        let methods = store::list_live(&mut transaction, account_id).await?;
        transaction.commit().await?;
        Ok(methods)
    }

    /// Detaches the card at the gateway and keeps it for history as `REMOVED`;
    /// the others close ranks. Removing it again returns it unchanged.
    pub async fn remove(
        &self,
        caller: &Caller,
        account_id: &AccountId,
        payment_method_id: &str,
    ) -> Result<PaymentMethod, BillingError> {
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account_id).await?;
        let method = store::find(&mut transaction, account_id, payment_method_id).await?;
        if method.status == MethodStatus::Removed {
            return Ok(method);
        }
        self.gateway
            .detach(&method.gateway_token)
            .await
            .map_err(|e| gateway_error("payment_method_id", e))?;
        store::update_state(
            &mut transaction,
            payment_method_id,
            MethodStatus::Removed,
            false,
            "",
        )
        .await?;
        let remaining: Vec<String> = store::list_live(&mut transaction, account_id)
            .await?
            .into_iter()
            .map(|m| m.payment_method_id)
            .collect();
        store::set_priorities(&mut transaction, &remaining).await?;
        audit::record(
            &mut transaction,
            caller,
            "remove_payment_method",
            Some(account_id.as_str()),
            serde_json::json!({ "payment_method_id": payment_method_id }),
        )
        .await?;
        let method = store::find(&mut transaction, account_id, payment_method_id).await?;
        transaction.commit().await?;
        Ok(method)
    }
}
