//! Saved cards: add (with 3-D Secure), confirm, auto-charge, order, remove.
//!
//! No transaction is open while the gateway is called. AddCard reserves its
//! idempotency key (with the id the card will get) under the account lock,
//! sets the card up at the gateway, then saves it under the lock; a replay
//! of the same request returns the saved card, or drives an unfinished one
//! to its end. ConfirmCard reads, asks the gateway, then settles under the
//! lock. RemovePaymentMethod removes under the lock, then detaches.

use std::collections::HashSet;

use tracing::Instrument;

use super::store::{self, NewMethod};
use super::{BillingAddress, MethodStatus, PaymentMethod, PaymentMethods, gateway_error};
use crate::audit;
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::gateway::{CardSource, GatewayError, Outcome};
use crate::ids::{AccountId, IdempotencyKey};
use crate::ledger::{forget_response, previous_response, remember_response, request_fingerprint};
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
        let key = new.idempotency_key.as_str();
        let account = new.account_id.as_str();

        // 1. Under the account lock: the key's earlier result, or the key
        //    reserved for this request with the id its card will get.
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, &new.account_id).await?;
        let payment_method_id = match previous_response(
            &mut transaction,
            account,
            key,
            ADD_CARD,
            &request_fingerprint,
        )
        .await?
        {
            Some(previous) => {
                let id = previous["payment_method_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if let Some(method) = find_saved(&mut transaction, &new.account_id, &id).await? {
                    transaction.commit().await?;
                    return Ok(method);
                }
                // Reserved by a call that has not finished (or never will):
                // this replay drives the same request to its end.
                id
            }
            None => {
                let id = new_method_id();
                remember_response(
                    &mut transaction,
                    account,
                    key,
                    ADD_CARD,
                    &request_fingerprint,
                    serde_json::json!({ "payment_method_id": id }),
                )
                .await?;
                id
            }
        };
        transaction.commit().await?;

        // Steps 2 and 3 run to their end even when the caller goes away (its
        // deadline, a dropped connection): a card set up at the gateway is
        // then saved under the key (a replay answers it) or detached, never
        // left attached with no record of it.
        let this = self.clone();
        let caller = caller.clone();
        let finish = async move {
            this.set_up_and_save(&caller, &new, payment_method_id, request_fingerprint)
                .await
        };
        crate::tasks::run_to_end("adding a card", finish).await
    }

    /// Steps 2 and 3 of [`Self::add_card`]: the set-up at the gateway, then
    /// the card saved under the account lock (or, a duplicate, detached).
    async fn set_up_and_save(
        &self,
        caller: &Caller,
        new: &NewCard,
        payment_method_id: String,
        request_fingerprint: String,
    ) -> Result<PaymentMethod, BillingError> {
        let key = new.idempotency_key.as_str();
        let account = new.account_id.as_str();
        // 2. The set-up at the gateway, with no transaction open.
        let setup = match self.gateway.setup_card(account, new.source.clone()).await {
            Ok(setup) => setup,
            Err(error) => {
                if matches!(
                    error,
                    GatewayError::UnknownToken | GatewayError::Rejected(_)
                ) {
                    // A refusal changes nothing: the key is free again.
                    self.release_key(
                        &new.account_id,
                        key,
                        &request_fingerprint,
                        &payment_method_id,
                    )
                    .await?;
                }
                return Err(gateway_error("gateway_token", error));
            }
        };
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
                return Err(BillingError::unavailable(
                    Reason::GatewayUnavailable,
                    "the payment gateway did not answer; retry with the same idempotency_key",
                ));
            }
        };

        // 3. Under the account lock again: save the card (once per key).
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, &new.account_id).await?;
        if let Some(method) =
            find_saved(&mut transaction, &new.account_id, &payment_method_id).await?
        {
            // A concurrent replay of the same request saved it first.
            transaction.commit().await?;
            if method.gateway_token != setup.card.token {
                self.detach_quietly(account, &setup.card.token).await;
            }
            return Ok(method);
        }
        if let Some(existing) =
            store::live_with_fingerprint(&mut transaction, &new.account_id, &setup.card.fingerprint)
                .await?
        {
            forget_response(
                &mut transaction,
                account,
                key,
                ADD_CARD,
                &request_fingerprint,
            )
            .await?;
            transaction.commit().await?;
            self.detach_quietly(account, &setup.card.token).await;
            return Err(BillingError::already_exists(
                Reason::CardAlreadySaved,
                format!("this card is already saved on the account as {existing}"),
            ));
        }
        // The first card to become ACTIVE on an account with no other ACTIVE
        // card is auto-charged (a card waiting for 3-D Secure decides when confirmed).
        let is_first = store::no_active_card(&mut transaction, &new.account_id, None).await?;
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
        audit::record_keyed(
            &mut transaction,
            caller,
            ADD_CARD,
            Some(account),
            Some(&new.idempotency_key),
            serde_json::json!({
                "payment_method_id": payment_method_id,
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

    /// Frees a key reserved by [`Self::add_card`] whose card was never saved.
    async fn release_key(
        &self,
        account_id: &AccountId,
        key: &str,
        request_fingerprint: &str,
        payment_method_id: &str,
    ) -> Result<(), BillingError> {
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account_id).await?;
        if find_saved(&mut transaction, account_id, payment_method_id)
            .await?
            .is_none()
        {
            forget_response(
                &mut transaction,
                account_id.as_str(),
                key,
                ADD_CARD,
                request_fingerprint,
            )
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Detaches a card set up but not saved (a duplicate, or a replay's
    /// second set-up), on a task of its own: the caller's answer does not
    /// wait for the processor, and its going away does not stop the detach.
    async fn detach_quietly(&self, account: &str, token: &str) {
        let gateway = self.gateway.clone();
        let (account, token) = (account.to_owned(), token.to_owned());
        let detach = async move {
            if let Err(error) = gateway.detach(&token).await {
                tracing::warn!(%error, account_id = account, "detaching a card that was not saved failed");
            }
        };
        tokio::spawn(detach.instrument(tracing::Span::current()));
    }

    /// Completes the 3-D Secure challenge: `ACTIVE` when passed, `FAILED` otherwise.
    /// Confirming again with the same result returns the method unchanged.
    ///
    /// Two steps around the gateway call, none open across it: read the
    /// method, ask the gateway, then settle under the account lock — unless a
    /// concurrent confirmation (or the processor's webhook) settled it first.
    pub async fn confirm_card(
        &self,
        caller: &Caller,
        account_id: &AccountId,
        payment_method_id: &str,
        authenticated: bool,
    ) -> Result<PaymentMethod, BillingError> {
        // The processor's answer is recorded even when the caller goes away.
        let this = self.clone();
        let caller = caller.clone();
        let account_id = account_id.clone();
        let payment_method_id = payment_method_id.to_owned();
        crate::tasks::run_to_end("confirming a card", async move {
            this.confirm_card_to_the_end(&caller, &account_id, &payment_method_id, authenticated)
                .await
        })
        .await
    }

    async fn confirm_card_to_the_end(
        &self,
        caller: &Caller,
        account_id: &AccountId,
        payment_method_id: &str,
        authenticated: bool,
    ) -> Result<PaymentMethod, BillingError> {
        let method = {
            let mut connection = self.pool.acquire().await?;
            store::find_live(&mut connection, account_id, payment_method_id).await?
        };
        if let Some(settled) = settled_confirmation(&method, authenticated)? {
            return Ok(settled);
        }
        let outcome = self
            .gateway
            .confirm_setup(&method.gateway_token, authenticated)
            .await;
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account_id).await?;
        let method = store::find_live(&mut transaction, account_id, payment_method_id).await?;
        if let Some(settled) = settled_confirmation(&method, authenticated)? {
            transaction.commit().await?;
            return Ok(settled);
        }
        let outcome = outcome.map_err(|e| gateway_error("payment_method_id", e))?;
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
                return Err(BillingError::unavailable(
                    Reason::GatewayUnavailable,
                    "the payment gateway did not complete the authentication; retry",
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
            return Err(BillingError::precondition(
                Reason::PaymentMethodNotActive,
                format!("payment_methods/{payment_method_id}"),
                "a payment method whose set-up failed cannot be charged; add the card again",
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

    /// Keeps the card for history as `REMOVED` (the others close ranks),
    /// then detaches it at the gateway. Removing it again returns it
    /// unchanged and detaches it again (a detach is idempotent), which
    /// completes a removal whose detach did not get through.
    ///
    /// The removal commits first, under the account lock; the gateway is
    /// called with no transaction open, so a slow processor delays nothing
    /// else on the account, and no charge starts on a card being removed.
    pub async fn remove(
        &self,
        caller: &Caller,
        account_id: &AccountId,
        payment_method_id: &str,
    ) -> Result<PaymentMethod, BillingError> {
        let mut transaction = self.pool.begin().await?;
        store::lock_account(&mut transaction, account_id).await?;
        let method = store::find(&mut transaction, account_id, payment_method_id).await?;
        let method = if method.status == MethodStatus::Removed {
            transaction.commit().await?;
            method
        } else {
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
            method
        };
        // The detach runs to its end even when the caller goes away.
        let gateway = self.gateway.clone();
        let token = method.gateway_token.clone();
        let detached = crate::tasks::run_to_end("detaching a removed card", async move {
            Ok(gateway.detach(&token).await)
        })
        .await?;
        match detached {
            Ok(()) => {}
            // The gateway does not know the card (any more): it is detached.
            Err(GatewayError::UnknownToken) => {
                tracing::info!(account_id = %account_id, payment_method_id, "removed card unknown to the gateway");
            }
            Err(error) => {
                tracing::warn!(account_id = %account_id, payment_method_id, %error, "card removed, but the gateway did not detach it");
                return Err(BillingError::unavailable(
                    Reason::GatewayUnavailable,
                    "the card is removed, but the payment gateway did not confirm the detach; retry RemovePaymentMethod",
                ));
            }
        }
        Ok(method)
    }
}

/// A saved card, or `None` when no card has this id on the account.
async fn find_saved(
    connection: &mut sqlx::PgConnection,
    account_id: &AccountId,
    payment_method_id: &str,
) -> Result<Option<PaymentMethod>, BillingError> {
    match store::find(connection, account_id, payment_method_id).await {
        Ok(method) => Ok(Some(method)),
        Err(BillingError::NotFound(_)) => Ok(None),
        Err(error) => Err(error),
    }
}

/// What ConfirmCard answers for a card no longer waiting for
/// authentication: itself when it reached the asked state, else why not.
/// `None`: it still waits.
fn settled_confirmation(
    method: &PaymentMethod,
    authenticated: bool,
) -> Result<Option<PaymentMethod>, BillingError> {
    match (method.status, authenticated) {
        (MethodStatus::PendingAuthentication, _) => Ok(None),
        (MethodStatus::Active, true) | (MethodStatus::Failed, false) => Ok(Some(method.clone())),
        _ => Err(BillingError::precondition(
            Reason::NotAwaitingAuthentication,
            format!("payment_methods/{}", method.payment_method_id),
            format!(
                "the payment method is {}, not waiting for authentication",
                method.status.as_str()
            ),
        )),
    }
}
