//! Payment methods: saved cards, their charge priority and auto-charge flag,
//! and 3-D Secure confirmation. This capability keeps the cards; it never
//! charges them (every charge goes through `topup`'s one charge path).
//!
//! - `cards`: add (through the gateway's set-up), confirm, auto-charge, reorder, remove;
//! - `auto_charge`: what the charge path reads of cards and the guarded
//!   state changes a charge causes;
//! - `store`: the SQL.
//!
//! Every change locks the account row first (`SELECT … FOR UPDATE`), so
//! idempotency checks, duplicate detection and priorities never race. No
//! transaction is open during a gateway call: set-up, confirmation and
//! detach run between two short transactions (see `cards`).

mod auto_charge;
mod cards;
mod store;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::error::{BillingError, Reason};
use crate::gateway::{GatewayError, PaymentGateway};
use crate::topup::PendingChallenge;

pub use auto_charge::{
    auto_charge_methods, cards_expiring_soon, disable_after_decline, find_method,
    has_active_auto_charge_method, live_methods, restore_after_success,
};
pub use cards::NewCard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodStatus {
    PendingAuthentication,
    Active,
    TemporarilyDisabled,
    Failed,
    Removed,
}

impl MethodStatus {
    const ALL: [MethodStatus; 5] = [
        MethodStatus::PendingAuthentication,
        MethodStatus::Active,
        MethodStatus::TemporarilyDisabled,
        MethodStatus::Failed,
        MethodStatus::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MethodStatus::PendingAuthentication => "PENDING_AUTHENTICATION",
            MethodStatus::Active => "ACTIVE",
            MethodStatus::TemporarilyDisabled => "TEMPORARILY_DISABLED",
            MethodStatus::Failed => "FAILED",
            MethodStatus::Removed => "REMOVED",
        }
    }

    pub fn parse(text: &str) -> Option<MethodStatus> {
        MethodStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillingAddress {
    pub line1: String,
    pub line2: String,
    pub city: String,
    pub postal_code: String,
    pub state: String,
    /// ISO 3166-1 alpha-2, or empty.
    pub country: String,
}

impl BillingAddress {
    /// Checks every line (bounded, no control characters) and the country
    /// code; the error names every bad one.
    pub fn parse(address: BillingAddress) -> Result<BillingAddress, BillingError> {
        use crate::ids::parse_text;
        let mut violations = crate::error::Violations::new();
        let country = address.country;
        if !country.is_empty()
            && (country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()))
        {
            violations.add(
                "billing_address.country",
                "must be an ISO 3166-1 alpha-2 code such as \"US\"",
            );
        }
        let mut line = |field: &str, text: &str, max_chars: usize| {
            violations.check(parse_text(field, text, max_chars))
        };
        let parsed = (
            line("billing_address.line1", &address.line1, 200),
            line("billing_address.line2", &address.line2, 200),
            line("billing_address.city", &address.city, 100),
            line("billing_address.postal_code", &address.postal_code, 20),
            line("billing_address.state", &address.state, 100),
        );
        let (Some(line1), Some(line2), Some(city), Some(postal_code), Some(state)) = parsed else {
            return Err(violations.into_error());
        };
        violations.finish()?;
        Ok(BillingAddress {
            line1,
            line2,
            city,
            postal_code,
            state,
            country,
        })
    }
}

#[derive(Debug, Clone)]
pub struct PaymentMethod {
    pub payment_method_id: String,
    pub account_id: String,
    pub status: MethodStatus,
    pub brand: String,
    pub last4: String,
    pub exp_month: i32,
    pub exp_year: i32,
    pub holder_name: String,
    pub billing_address: BillingAddress,
    pub auto_charge: bool,
    /// 1 = tried first; 0 once removed.
    pub priority: i32,
    /// The first active auto-charge method of the account.
    pub primary: bool,
    pub disabled_reason: String,
    /// The open 3-D Secure challenge while `PendingAuthentication`.
    pub challenge: Option<PendingChallenge>,
    pub created_at: DateTime<Utc>,
    pub(crate) gateway_token: String,
}

/// The payment-methods capability: the database and the card processor.
#[derive(Clone)]
pub struct PaymentMethods {
    pool: PgPool,
    gateway: Arc<dyn PaymentGateway>,
}

impl PaymentMethods {
    pub fn new(pool: PgPool, gateway: Arc<dyn PaymentGateway>) -> Self {
        Self { pool, gateway }
    }
}

/// Gateway failures as the caller sees them; the cause is logged, never shown.
fn gateway_error(field: &str, error: GatewayError) -> BillingError {
    match error {
        GatewayError::UnknownToken => {
            BillingError::invalid(field, "is not a card token the payment gateway knows")
        }
        GatewayError::Rejected(reason) => BillingError::precondition(
            Reason::GatewayRejected,
            "",
            format!("the payment gateway refused the request: {reason}"),
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
