//! Top-ups: every charge that refills a balance — manual (Add Funds), retry
//! of a payment method, and automatic — with each gateway attempt.
//!
//! - `pipeline`: the ONE place where a card is charged and a result settled;
//!   the three triggers differ only in their inputs (cards, on- or
//!   off-session, amount rule). See `docs/ARCHITECTURE.md` for the lifecycle.
//! - `funds`: the manual triggers' requests (Add Funds, Retry);
//! - `crossing`: the per-account crossing state and when an automatic top-up starts;
//! - `decide` / `runner`: the balance-event subscriber (alerts, then crossings);
//! - `engine`: drives due top-ups, reconciles unknown outcomes, resumes capped chains;
//! - `react`: the in-memory shortcut from a crossing committed here (or a
//!   top-up the subscriber started) to its charge;
//! - `bounds`: refill bounds per currency; `settings`: the Low Balance Settings.
//!
//! This module owns the `top_ups`, `top_up_attempts` and `top_up_crossings`
//! records. The gateway idempotency key of an attempt is derived from the
//! top-up id and the attempt number, and the ledger credit's key from the
//! top-up id in a namespace no client key can produce, so a retried request
//! can neither charge twice nor credit twice.

mod bounds;
mod clock;
mod confirm;
mod crossing;
mod decide;
mod engine;
mod funds;
mod pipeline;
mod react;
mod runner;
mod settings;
mod store;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::money::Currency;

pub use bounds::{RefillBounds, parse_refill_bounds};
pub use clock::{Clock, ManualClock, SystemClock};
pub use crossing::refill_multiple;
pub use decide::PolicyDecider;
pub use engine::{TopUpEngine, engine_caller};
pub use funds::{FundsRequest, FundsResult};
pub use pipeline::TopUps;
pub use react::{REACTOR_CHANNEL, StartedTopUp, TopUpReactor};
pub use runner::run_policy_decisions;
pub use settings::{
    LowBalanceSettings, PolicyConfig, SettingsChange, apply_settings, check_refill_amount,
    get_settings,
};
pub use store::{get, list, owner};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Automatic,
    Manual,
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUpStatus {
    Pending,
    Succeeded,
    RetryScheduled,
    Failed,
    RequiresAction,
    Unknown,
    CapReached,
    /// An automatic top-up no longer wanted (`auto_refill_disabled`, `balance_restored`).
    Canceled,
    /// An outcome that could not be reconciled, or a charge that could not be
    /// credited: an operator must look; the account's gate stays closed.
    NeedsAttention,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Succeeded,
    Declined,
    RequiresAction,
    Unknown,
}

macro_rules! text_enum {
    ($type:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $type {
            pub fn as_str(self) -> &'static str {
                match self { $($type::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<$type> {
                match text { $($text => Some($type::$variant),)+ _ => None }
            }
        }
    };
}

text_enum!(Trigger { Automatic => "AUTOMATIC", Manual => "MANUAL", Retry => "RETRY" });

impl Trigger {
    /// For people: the ledger description and logs.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Automatic => "automatic",
            Trigger::Manual => "manual",
            Trigger::Retry => "retry",
        }
    }
}
text_enum!(TopUpStatus {
    Pending => "PENDING",
    Succeeded => "SUCCEEDED",
    RetryScheduled => "RETRY_SCHEDULED",
    Failed => "FAILED",
    RequiresAction => "REQUIRES_ACTION",
    Unknown => "UNKNOWN",
    CapReached => "CAP_REACHED",
    Canceled => "CANCELED",
    NeedsAttention => "NEEDS_ATTENTION",
});
text_enum!(AttemptOutcome {
    Succeeded => "SUCCEEDED",
    Declined => "DECLINED",
    RequiresAction => "REQUIRES_ACTION",
    Unknown => "UNKNOWN",
});

impl TopUpStatus {
    /// Nothing more will happen to a top-up in this state without a new request.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TopUpStatus::Succeeded
                | TopUpStatus::Failed
                | TopUpStatus::RequiresAction
                | TopUpStatus::CapReached
                | TopUpStatus::Canceled
                | TopUpStatus::NeedsAttention
        )
    }
}

/// Why an automatic top-up ended `CANCELED`.
pub mod cancel_reason {
    /// Auto refill was switched off before the top-up charged anything more.
    pub const AUTO_REFILL_DISABLED: &str = "auto_refill_disabled";
    /// Total balance was at or above the threshold when a round began.
    pub const BALANCE_RESTORED: &str = "balance_restored";
}

#[derive(Debug, Clone)]
pub struct TopUpAttempt {
    pub attempt_number: i32,
    pub payment_method_id: String,
    pub outcome: AttemptOutcome,
    pub decline_code: String,
    pub hard_decline: bool,
    pub amount: Decimal,
    pub attempted_at: DateTime<Utc>,
    /// Automatic top-ups: the round (over every card) it belongs to; manual: 0.
    pub round: i32,
    /// The 3-D Secure challenge the attempt was answered with, if any.
    pub challenge: Option<PendingChallenge>,
}

/// An open 3-D Secure challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChallenge {
    pub challenge_id: String,
    pub redirect_url: String,
}

#[derive(Debug, Clone)]
pub struct TopUp {
    pub top_up_id: String,
    pub account_id: String,
    pub trigger: Trigger,
    pub status: TopUpStatus,
    pub amount: Decimal,
    pub currency: Currency,
    /// The method asked for; `None` = by charge priority.
    pub payment_method_id: Option<String>,
    pub transaction_id: Option<Uuid>,
    pub failure_reason: String,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub challenge: Option<PendingChallenge>,
    pub created_at: DateTime<Utc>,
    /// Automatic top-ups: rounds over every method that have failed so far.
    pub rounds: i32,
    /// Automatic top-ups: the crossing they belong to (a crossing may chain several).
    pub crossing_key: Option<String>,
    /// Times the gateway was asked about an unknown outcome.
    pub reconcile_tries: i32,
    pub attempts: Vec<TopUpAttempt>,
}

pub fn new_top_up_id() -> String {
    format!("tu_{}", Uuid::now_v7().simple())
}

/// The gateway idempotency key of one attempt of a top-up.
pub fn gateway_key(top_up_id: &str, attempt_number: i32) -> String {
    format!("{top_up_id}:attempt-{attempt_number}")
}

/// The top-up and attempt number a gateway idempotency key was derived from.
pub fn parse_gateway_key(key: &str) -> Option<(&str, i32)> {
    let (top_up_id, attempt) = key.rsplit_once(":attempt-")?;
    let attempt: i32 = attempt.parse().ok().filter(|n| *n > 0)?;
    top_up_id.starts_with("tu_").then_some((top_up_id, attempt))
}

/// The ledger idempotency key of a top-up's credit: in the internal
/// namespace (see [`crate::ids::IdempotencyKey::internal`]), which no client
/// key can reach.
pub fn ledger_key(top_up_id: &str) -> crate::ids::IdempotencyKey {
    crate::ids::IdempotencyKey::internal("top-up", top_up_id)
}
