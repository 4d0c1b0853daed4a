//! Top-ups: every charge that refills a balance — manual (Add Funds), retry
//! of a payment method, and (later) automatic — with each gateway attempt.
//!
//! This module owns the `top_ups` and `top_up_attempts` records. The gateway
//! idempotency key of an attempt is derived from the top-up id and the attempt
//! number, and the ledger credit's key from the top-up id, so a retried request
//! can neither charge twice nor credit twice.

mod clock;
mod decide;
mod engine;
mod runner;
mod settings;
mod store;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::money::Currency;

pub use clock::{Clock, ManualClock, SystemClock};
pub use decide::{PolicyDecider, refill_multiple};
pub use engine::{TopUpEngine, engine_caller};
pub use runner::run_policy_decisions;
pub use settings::{
    LowBalanceSettings, PolicyConfig, SettingsChange, apply_settings, get_settings,
};
pub use store::{NewTopUp, finish, get, insert, list, lock, owner, record_attempt};

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
text_enum!(TopUpStatus {
    Pending => "PENDING",
    Succeeded => "SUCCEEDED",
    RetryScheduled => "RETRY_SCHEDULED",
    Failed => "FAILED",
    RequiresAction => "REQUIRES_ACTION",
    Unknown => "UNKNOWN",
    CapReached => "CAP_REACHED",
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
        )
    }
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

/// The ledger idempotency key of a top-up's credit.
pub fn ledger_key(top_up_id: &str) -> String {
    format!("top-up:{top_up_id}")
}
