//! The ledger: accounts, their immutable entries, and the balance events
//! written with each entry.
//!
//! Every change locks the account row (`SELECT … FOR UPDATE`), checks the
//! idempotency key under that lock, appends one entry, moves the balance,
//! appends one balance event and one audit row — all in one transaction, so
//! `balance == sum(entries)` always holds and concurrent debits serialize.

mod accounts;
mod batch;
mod batch_write;
mod history;
mod idempotency;
mod postings;
mod verify;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use accounts::{NewAccount, create_account, get_account, load_account};
pub use batch::{BatchSettings, DebitBatcher};
pub use history::{EntryFilter, list_entries};
pub use idempotency::request_fingerprint;
pub(crate) use idempotency::{forget_response, previous_response, remember_response};
pub use postings::{Posting, PostingResult, post, post_in_transaction};
pub use verify::{LedgerMismatch, LedgerReport, verify_ledger};

use crate::money::Currency;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub account_id: String,
    #[serde(with = "currency_code")]
    pub currency: Currency,
    pub display_name: String,
    pub billing_email: String,
    pub balance: Decimal,
    pub credit_limit: Decimal,
    pub version: i64,
    pub created_at: DateTime<Utc>,
}

impl Account {
    /// What usage may spend: balance plus the credit limit.
    pub fn total_balance(&self) -> Decimal {
        self.balance + self.credit_limit
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Usage,
    Adjustment,
    Refund,
    Promotion,
    TopUp,
}

impl EntryKind {
    pub const ALL: [EntryKind; 5] = [
        EntryKind::Usage,
        EntryKind::Adjustment,
        EntryKind::Refund,
        EntryKind::Promotion,
        EntryKind::TopUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Usage => "usage",
            EntryKind::Adjustment => "adjustment",
            EntryKind::Refund => "refund",
            EntryKind::Promotion => "promotion",
            EntryKind::TopUp => "top_up",
        }
    }

    pub fn parse(text: &str) -> Option<EntryKind> {
        EntryKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }

    /// Usage takes money away; everything else adds it.
    pub fn is_debit(self) -> bool {
        self == EntryKind::Usage
    }

    /// The balance event this kind of entry produces.
    pub fn event_kind(self) -> &'static str {
        match self {
            EntryKind::Usage => "debited",
            EntryKind::TopUp => "topped_up",
            _ => "credited",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub entry_id: i64,
    pub transaction_id: Uuid,
    pub account_id: String,
    pub kind: EntryKind,
    /// Signed: negative for debits.
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
}

mod currency_code {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::money::Currency;

    pub fn serialize<S: Serializer>(currency: &Currency, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(currency.code())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Currency, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::parse(&code).map_err(serde::de::Error::custom)
    }
}

/// Reads a `CHAR(3)` currency column written by this service.
pub(crate) fn currency_from_column(code: &str) -> Result<Currency, crate::BillingError> {
    Currency::parse(code.trim()).map_err(|_| {
        crate::BillingError::Unexpected(anyhow::anyhow!(
            "unknown currency {code:?} in the database"
        ))
    })
}
