//! The Stripe gateway: [`PaymentGateway`] over Stripe's REST API.
//!
//! - Cards arrive as PaymentMethod ids (`pm_…`) from client-side tokenization
//!   (Stripe.js / Elements); a raw card number is never sent from here.
//! - One Stripe Customer per account (`stripe_customers`), created on the
//!   first card; each card is attached to it by a SetupIntent with
//!   `usage=off_session`, and its Customer and SetupIntent are remembered
//!   (`stripe_payment_methods`) for charges and for ConfirmCard.
//! - Charges are PaymentIntents confirmed at once, with the attempt's key as
//!   `Idempotency-Key` and as `metadata[idempotency_key]`, which is how
//!   [`PaymentGateway::find_charge`] finds them again (Stripe's search).
//! - No answer (timeout, connection lost, HTTP 5xx) to a charge is
//!   [`Outcome::Unknown`]; the caller reconciles.
//!
//! `api` speaks HTTP and maps Stripe's objects; `signature` and `webhook`
//! receive Stripe's events. Like the sandbox, this gateway keeps its own
//! tables and knows nothing of balances or the ledger.

mod api;
pub mod signature;
pub mod webhook;

use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sqlx::PgPool;

use super::{
    CardSource, Charge, ChargeRequest, GatewayError, Outcome, PaymentGateway, SavedCard, Setup,
};
use crate::money::Currency;

use api::{Client, NoAnswer, Reply};
pub use api::{SecretKey, is_hard_decline};

pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

#[derive(Debug, Clone)]
pub struct StripeSettings {
    /// `https://api.stripe.com`, or a test server.
    pub api_base: String,
    pub secret_key: SecretKey,
    /// Longest wait for one Stripe call; past it a charge's outcome is unknown.
    pub timeout: Duration,
    /// Where Stripe sends the customer back after a 3-D Secure redirect; when
    /// set, Stripe answers "requires action" with a `redirect_to_url`.
    pub return_url: Option<String>,
}

impl StripeSettings {
    pub fn new(api_base: impl Into<String>, secret_key: SecretKey) -> Self {
        Self {
            api_base: api_base.into(),
            secret_key,
            timeout: Duration::from_secs(30),
            return_url: None,
        }
    }
}

#[derive(Clone)]
pub struct StripeGateway {
    pool: PgPool,
    client: Client,
    return_url: Option<String>,
}

/// Stripe ids are `prefix_` + alphanumerics: safe in a URL path.
fn is_stripe_id(text: &str, prefix: &str) -> bool {
    text.len() <= 255
        && text.starts_with(prefix)
        && text.len() > prefix.len()
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An amount in the currency's minor units (cents), exactly: 12.50 USD → 1250.
pub fn minor_units(amount: Decimal, currency: Currency) -> Result<i64, GatewayError> {
    let factor = Decimal::from(10_i64.pow(currency.minor_units()));
    let scaled = amount
        .checked_mul(factor)
        .filter(|scaled| scaled.fract().is_zero() && scaled.is_sign_positive() && !scaled.is_zero())
        .and_then(|scaled| scaled.to_i64());
    scaled.ok_or_else(|| {
        GatewayError::Rejected(format!(
            "the amount is not a positive whole number of {} minor units",
            currency.code()
        ))
    })
}

fn no_answer(what: &str, error: NoAnswer) -> GatewayError {
    GatewayError::Unexpected(anyhow!("{what}: {error}"))
}

fn unexpected_reply(what: &str, reply: &Reply) -> GatewayError {
    GatewayError::Unexpected(anyhow!(
        "{what}: stripe answered HTTP {} ({})",
        reply.status.as_u16(),
        reply.error().label()
    ))
}

impl StripeGateway {
    pub fn new(pool: PgPool, settings: StripeSettings) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            client: Client::new(&settings.api_base, settings.secret_key, settings.timeout)?,
            return_url: settings.return_url,
        })
    }

    /// The account's Stripe Customer, created the first time. Stripe's
    /// idempotency key makes two racing replicas get the same Customer.
    async fn customer_for(&self, account_reference: &str) -> Result<String, GatewayError> {
        let known: Option<String> =
            sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE account_id = $1")
                .bind(account_reference)
                .fetch_optional(&self.pool)
                .await
                .context("reading a stripe customer")?;
        if let Some(customer_id) = known {
            return Ok(customer_id);
        }
        let reply = self
            .client
            .post(
                "/v1/customers",
                &[("metadata[account_id]", account_reference.to_owned())],
                Some(&format!("billing-customer:{account_reference}")),
            )
            .await
            .map_err(|e| no_answer("creating a stripe customer", e))?;
        if !reply.is_success() {
            return Err(unexpected_reply("creating a stripe customer", &reply));
        }
        let customer: api::Customer = reply.object("customer")?;
        sqlx::query(
            "INSERT INTO stripe_customers (account_id, customer_id) VALUES ($1, $2) \
             ON CONFLICT (account_id) DO NOTHING",
        )
        .bind(account_reference)
        .bind(&customer.id)
        .execute(&self.pool)
        .await
        .context("saving a stripe customer")?;
        let customer_id: String =
            sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE account_id = $1")
                .bind(account_reference)
                .fetch_one(&self.pool)
                .await
                .context("reading a stripe customer")?;
        tracing::info!(
            account_id = account_reference,
            customer_id,
            "stripe customer created"
        );
        Ok(customer_id)
    }

    /// The card behind a PaymentMethod id (brand, last 4, expiry, fingerprint).
    async fn card_of(&self, payment_method: &str) -> Result<SavedCard, GatewayError> {
        let reply = self
            .client
            .get(&format!("/v1/payment_methods/{payment_method}"), &[])
            .await
            .map_err(|e| no_answer("reading a stripe payment method", e))?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(GatewayError::UnknownToken);
        }
        if !reply.is_success() {
            return Err(unexpected_reply("reading a stripe payment method", &reply));
        }
        let object: api::PaymentMethodObject = reply.object("payment method")?;
        let card = object.card.ok_or_else(|| {
            GatewayError::Rejected("the stripe payment method is not a card".into())
        })?;
        Ok(SavedCard {
            fingerprint: card
                .fingerprint
                .unwrap_or_else(|| format!("stripe:{}", object.id)),
            token: object.id,
            brand: card.brand,
            last4: card.last4,
            exp_month: card.exp_month,
            exp_year: card.exp_year,
        })
    }

    /// The Customer and SetupIntent a card was saved with.
    async fn saved(&self, payment_method: &str) -> Result<(String, String), GatewayError> {
        sqlx::query_as(
            "SELECT customer_id, setup_intent_id FROM stripe_payment_methods WHERE payment_method_id = $1",
        )
        .bind(payment_method)
        .fetch_optional(&self.pool)
        .await
        .context("reading a stripe payment method")?
        .ok_or(GatewayError::UnknownToken)
    }
}

#[async_trait]
impl PaymentGateway for StripeGateway {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn accepts_raw_cards(&self) -> bool {
        false
    }

    async fn setup_card(
        &self,
        account_reference: &str,
        source: CardSource,
    ) -> Result<Setup, GatewayError> {
        let payment_method = match source {
            CardSource::Token(token) if is_stripe_id(&token, "pm_") => token,
            CardSource::Token(_) => return Err(GatewayError::UnknownToken),
            CardSource::Card(_) => {
                return Err(GatewayError::Rejected(
                    "raw card numbers are never sent to stripe; tokenize the card client-side"
                        .into(),
                ));
            }
        };
        let card = self.card_of(&payment_method).await?;
        let customer = self.customer_for(account_reference).await?;
        let mut form = vec![
            ("customer", customer.clone()),
            ("payment_method", payment_method.clone()),
            ("confirm", "true".to_owned()),
            ("usage", "off_session".to_owned()),
            ("payment_method_types[]", "card".to_owned()),
        ];
        if let Some(url) = &self.return_url {
            form.push(("return_url", url.clone()));
        }
        let reply = self
            .client
            .post(
                "/v1/setup_intents",
                &form,
                Some(&format!(
                    "billing-setup:{account_reference}:{payment_method}"
                )),
            )
            .await
            .map_err(|e| no_answer("setting a card up at stripe", e))?;
        let (setup_intent_id, outcome) = if reply.is_success() {
            let intent: api::SetupIntent = reply.object("setup intent")?;
            (intent.id.clone(), api::outcome_of_setup(&intent))
        } else {
            let error = reply.error();
            match (reply.status.as_u16(), error.kind.as_str()) {
                (402, "card_error") => (
                    error
                        .setup_intent
                        .as_ref()
                        .map(|i| i.id.clone())
                        .unwrap_or_default(),
                    api::setup_outcome_of_card_error(&error),
                ),
                (400 | 404, _) if error.code.as_deref() == Some("resource_missing") => {
                    return Err(GatewayError::UnknownToken);
                }
                (400..=499, "invalid_request_error") => {
                    tracing::warn!(stripe_error = %error.label(), "stripe refused a card set-up");
                    return Err(GatewayError::Rejected(format!(
                        "stripe refused the card set-up ({})",
                        error.code.as_deref().unwrap_or("invalid_request")
                    )));
                }
                _ => return Err(unexpected_reply("setting a card up at stripe", &reply)),
            }
        };
        sqlx::query(
            "INSERT INTO stripe_payment_methods (payment_method_id, customer_id, setup_intent_id) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (payment_method_id) DO UPDATE \
                SET customer_id = EXCLUDED.customer_id, setup_intent_id = EXCLUDED.setup_intent_id",
        )
        .bind(&payment_method)
        .bind(&customer)
        .bind(&setup_intent_id)
        .execute(&self.pool)
        .await
        .context("saving a stripe payment method")?;
        Ok(Setup { card, outcome })
    }

    /// Stripe's SetupIntent is the truth: `authenticated` only tells what to
    /// do while it still waits (the customer gave up: cancel it).
    async fn confirm_setup(
        &self,
        token: &str,
        authenticated: bool,
    ) -> Result<Outcome, GatewayError> {
        let (_, setup_intent_id) = self.saved(token).await?;
        if !is_stripe_id(&setup_intent_id, "seti_") {
            return Err(GatewayError::Rejected(
                "the card has no stripe set-up to confirm".into(),
            ));
        }
        let reply = self
            .client
            .get(&format!("/v1/setup_intents/{setup_intent_id}"), &[])
            .await
            .map_err(|e| no_answer("reading a stripe setup intent", e))?;
        if !reply.is_success() {
            return Err(unexpected_reply("reading a stripe setup intent", &reply));
        }
        let intent: api::SetupIntent = reply.object("setup intent")?;
        match (api::outcome_of_setup(&intent), authenticated) {
            (Outcome::RequiresAction { .. }, true) => Err(GatewayError::Rejected(
                "stripe has not seen the 3-D Secure authentication complete yet".into(),
            )),
            (Outcome::RequiresAction { .. }, false) => {
                let reply = self
                    .client
                    .post(
                        &format!("/v1/setup_intents/{setup_intent_id}/cancel"),
                        &[],
                        None,
                    )
                    .await
                    .map_err(|e| no_answer("cancelling a stripe setup intent", e))?;
                if !reply.is_success() {
                    return Err(unexpected_reply("cancelling a stripe setup intent", &reply));
                }
                Ok(Outcome::Declined {
                    code: "authentication_failed".into(),
                    hard: false,
                })
            }
            (Outcome::Declined { code, hard }, _) if code == "setup_failed" => {
                Ok(Outcome::Declined {
                    code: "authentication_failed".into(),
                    hard,
                })
            }
            (outcome, _) => Ok(outcome),
        }
    }

    async fn charge(&self, request: ChargeRequest) -> Result<Charge, GatewayError> {
        let amount = minor_units(request.amount, request.currency)?;
        let (customer, _) = self.saved(&request.token).await?;
        let mut form = vec![
            ("amount", amount.to_string()),
            ("currency", request.currency.code().to_ascii_lowercase()),
            ("customer", customer),
            ("payment_method", request.token.clone()),
            ("confirm", "true".to_owned()),
            ("payment_method_types[]", "card".to_owned()),
            ("metadata[idempotency_key]", request.idempotency_key.clone()),
        ];
        if request.off_session {
            form.push(("off_session", "true".to_owned()));
        } else if let Some(url) = &self.return_url {
            form.push(("return_url", url.clone()));
        }
        let reply = match self
            .client
            .post("/v1/payment_intents", &form, Some(&request.idempotency_key))
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                tracing::warn!(idempotency_key = %request.idempotency_key, %error, "stripe charge unanswered; outcome unknown");
                return Ok(Charge {
                    charge_id: None,
                    outcome: Outcome::Unknown,
                });
            }
        };
        if reply.is_success() {
            let intent: api::PaymentIntent = reply.object("payment intent")?;
            return Ok(api::charge_of_intent(&intent));
        }
        let error = reply.error();
        match (reply.status.as_u16(), error.kind.as_str()) {
            (402, "card_error") => Ok(api::charge_of_card_error(&error)),
            // 409: the same key is in flight elsewhere; 5xx: Stripe may have acted.
            (409 | 500..=599, _) => {
                tracing::warn!(idempotency_key = %request.idempotency_key, status = reply.status.as_u16(), stripe_error = %error.label(), "stripe charge outcome unknown");
                Ok(Charge {
                    charge_id: None,
                    outcome: Outcome::Unknown,
                })
            }
            (400 | 404, _) if error.code.as_deref() == Some("resource_missing") => {
                Err(GatewayError::UnknownToken)
            }
            (400..=499, "invalid_request_error" | "idempotency_error") => {
                tracing::warn!(idempotency_key = %request.idempotency_key, stripe_error = %error.label(), "stripe refused a charge");
                Err(GatewayError::Rejected(format!(
                    "stripe refused the charge ({})",
                    error.code.as_deref().unwrap_or(&error.kind)
                )))
            }
            _ => Err(unexpected_reply("charging at stripe", &reply)),
        }
    }

    /// Stripe's search is eventually consistent (about a minute): a charge
    /// made just now may not be found yet. The callers then charge again with
    /// the same `Idempotency-Key`, which Stripe answers with the first result.
    async fn find_charge(&self, idempotency_key: &str) -> Result<Option<Charge>, GatewayError> {
        let escaped = idempotency_key.replace('\\', "\\\\").replace('\'', "\\'");
        let query = format!("metadata['idempotency_key']:'{escaped}'");
        let reply = self
            .client
            .get("/v1/payment_intents/search", &[("query", &query)])
            .await
            .map_err(|e| no_answer("searching stripe payment intents", e))?;
        if !reply.is_success() {
            return Err(unexpected_reply("searching stripe payment intents", &reply));
        }
        let found: api::SearchResult<api::PaymentIntent> = reply.object("search result")?;
        Ok(found
            .data
            .iter()
            .find(|intent| {
                intent.metadata.get("idempotency_key").map(String::as_str) == Some(idempotency_key)
            })
            .map(api::charge_of_intent))
    }

    async fn confirm_charge(
        &self,
        idempotency_key: &str,
        _authenticated: bool,
    ) -> Result<Charge, GatewayError> {
        // The customer completed (or abandoned) the challenge in the browser
        // with Stripe.js `handleNextAction`: the PaymentIntent's own state is the answer.
        self.find_charge(idempotency_key).await?.ok_or_else(|| {
            GatewayError::Rejected("stripe has no payment intent for this top-up".into())
        })
    }

    async fn detach(&self, token: &str) -> Result<(), GatewayError> {
        if !is_stripe_id(token, "pm_") {
            return Err(GatewayError::UnknownToken);
        }
        let reply = self
            .client
            .post(&format!("/v1/payment_methods/{token}/detach"), &[], None)
            .await
            .map_err(|e| no_answer("detaching a stripe payment method", e))?;
        let error = reply.error();
        // Already detached or gone: the wanted state.
        let already =
            matches!(reply.status.as_u16(), 400 | 404) && error.kind == "invalid_request_error";
        if !reply.is_success() && !already {
            return Err(unexpected_reply(
                "detaching a stripe payment method",
                &reply,
            ));
        }
        sqlx::query(
            "UPDATE stripe_payment_methods SET detached_at = COALESCE(detached_at, now()) \
              WHERE payment_method_id = $1",
        )
        .bind(token)
        .execute(&self.pool)
        .await
        .context("detaching a stripe payment method")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn amounts_become_exact_minor_units() {
        let usd = Currency::USD;
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(
            minor_units(Decimal::from_str("12.50").unwrap(), usd).unwrap(),
            1250
        );
        assert_eq!(
            minor_units(Decimal::from_str("30").unwrap(), usd).unwrap(),
            3000
        );
        assert_eq!(
            minor_units(Decimal::from_str("0.01").unwrap(), usd).unwrap(),
            1
        );
        assert_eq!(
            minor_units(Decimal::from_str("1500").unwrap(), jpy).unwrap(),
            1500
        );
        assert!(minor_units(Decimal::from_str("12.505").unwrap(), usd).is_err());
        assert!(minor_units(Decimal::from_str("1.5").unwrap(), jpy).is_err());
        assert!(minor_units(Decimal::ZERO, usd).is_err());
    }

    #[test]
    fn only_plain_stripe_ids_pass() {
        assert!(is_stripe_id("pm_1Abc", "pm_"));
        assert!(!is_stripe_id("pm_", "pm_"));
        assert!(!is_stripe_id("pm_../../v1/charges", "pm_"));
        assert!(!is_stripe_id("tok_visa", "pm_"));
    }
}
