//! The payment gateway: what a card processor does for us, shaped like a
//! real one (Stripe-style set-up intents and off-session charges).
//!
//! - [`PaymentGateway::setup_card`] saves a card for later use; it may answer
//!   "requires action" with a 3-D Secure challenge, completed by
//!   [`PaymentGateway::confirm_setup`].
//! - [`PaymentGateway::charge`] charges a saved card on- or off-session with an
//!   idempotency key: the same key never charges twice.
//! - [`PaymentGateway::find_charge`] looks a charge up by that key, to
//!   reconcile a call whose outcome was unknown (a timeout).
//! - [`PaymentGateway::confirm_charge`] completes a charge that asked for
//!   3-D Secure (a top-up waiting for the customer).
//! - [`PaymentGateway::detach`] forgets a saved card.
//!
//! The gateway knows cards and charges, nothing of accounts' balances or the ledger.

pub mod sandbox;
pub mod stripe;

use async_trait::async_trait;
use rust_decimal::Decimal;

use crate::card::CardDetails;
use crate::money::Currency;

pub use sandbox::SandboxGateway;
pub use stripe::{StripeGateway, StripeSettings};

/// Where a card to set up comes from.
#[derive(Debug, Clone)]
pub enum CardSource {
    /// A raw card (the sandbox only; real processors tokenize client-side).
    Card(CardDetails),
    /// A token from client-side tokenization.
    Token(String),
}

/// A 3-D Secure challenge the customer must complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub challenge_id: String,
    pub redirect_url: String,
}

/// The outcome of a gateway call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Declined {
        code: String,
        hard: bool,
    },
    RequiresAction {
        challenge: Challenge,
    },
    /// Timeout or network failure: the processor may or may not have acted.
    Unknown,
}

/// What the processor tells about a saved card: never the number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedCard {
    pub token: String,
    pub brand: String,
    pub last4: String,
    pub exp_month: u32,
    pub exp_year: i32,
    /// Equal for equal card numbers (duplicate detection).
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct Setup {
    pub card: SavedCard,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub token: String,
    pub amount: Decimal,
    pub currency: Currency,
    pub idempotency_key: String,
    /// True when the customer is not present (automatic top-ups).
    pub off_session: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The processor's id; absent when the outcome is unknown.
    pub charge_id: Option<String>,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The token is not one this processor issued (or it was detached).
    #[error("the gateway does not know this card token")]
    UnknownToken,
    /// The request does not fit the card's state (e.g. confirming a card with no challenge).
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// A short name stored with each payment method ("sandbox", "stripe").
    fn name(&self) -> &'static str;

    /// False when cards must come tokenized client-side (a real processor:
    /// raw numbers never leave this service).
    fn accepts_raw_cards(&self) -> bool {
        true
    }

    /// Saves a card for the account named by `account_reference` (an opaque
    /// id: processors keep one customer per account).
    async fn setup_card(
        &self,
        account_reference: &str,
        source: CardSource,
    ) -> Result<Setup, GatewayError>;

    /// Completes the 3-D Secure challenge of a card set up with `RequiresAction`.
    async fn confirm_setup(
        &self,
        token: &str,
        authenticated: bool,
    ) -> Result<Outcome, GatewayError>;

    async fn charge(&self, request: ChargeRequest) -> Result<Charge, GatewayError>;

    /// The charge made with `idempotency_key`, if the processor has one.
    async fn find_charge(&self, idempotency_key: &str) -> Result<Option<Charge>, GatewayError>;

    /// Completes the 3-D Secure challenge of the charge made with
    /// `idempotency_key` (it answered `RequiresAction`) and returns its
    /// outcome. The sandbox applies `authenticated`; a real processor's
    /// customer authenticates in the browser, so there `authenticated` is a
    /// hint and the charge's real state is read. Confirming a charge that is
    /// no longer waiting returns its state. `Rejected` when there is no such charge.
    async fn confirm_charge(
        &self,
        idempotency_key: &str,
        authenticated: bool,
    ) -> Result<Charge, GatewayError>;

    async fn detach(&self, token: &str) -> Result<(), GatewayError>;
}
