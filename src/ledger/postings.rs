//! Debits and credits: one ledger entry, the new balance, one balance event.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::accounts::{LOCK_ACCOUNT_SQL, account_from_row};
use super::{EntryKind, LedgerEntry, idempotency};
use crate::audit;
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::ids::{AccountId, IdempotencyKey};

/// The largest absolute balance the `NUMERIC(24, 6)` columns hold, with margin.
pub(super) const BALANCE_LIMIT: i64 = 100_000_000_000_000_000;

#[derive(Debug, Clone)]
pub struct Posting {
    pub account_id: AccountId,
    pub kind: EntryKind,
    /// Positive; the kind decides the sign.
    pub amount: Decimal,
    pub idempotency_key: IdempotencyKey,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    /// Debit even when total_balance would fall below zero.
    pub allow_overdraft: bool,
}

impl Posting {
    pub(super) fn fingerprint(&self) -> String {
        let metadata = serde_json::to_string(&self.metadata).unwrap_or_default();
        idempotency::request_fingerprint(
            "post",
            &[
                self.kind.as_str(),
                &self.amount.normalize().to_string(),
                &self.description,
                &metadata,
                if self.allow_overdraft {
                    "overdraft"
                } else {
                    ""
                },
            ],
        )
    }

    pub(super) fn signed_amount(&self) -> Decimal {
        if self.kind.is_debit() {
            -self.amount
        } else {
            self.amount
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostingResult {
    pub entry: LedgerEntry,
    pub balance: Decimal,
    pub total_balance: Decimal,
    pub version: i64,
    pub currency: String,
}

/// Posts one entry in its own transaction.
#[tracing::instrument(name = "ledger.post", skip_all, fields(account_id = %posting.account_id, kind = posting.kind.as_str()))]
pub async fn post(
    pool: &PgPool,
    caller: &Caller,
    posting: Posting,
) -> Result<PostingResult, BillingError> {
    let mut transaction = pool.begin().await?;
    let result = post_in_transaction(&mut transaction, caller, &posting).await?;
    transaction.commit().await?;
    tracing::debug!(
        account_id = %posting.account_id,
        kind = posting.kind.as_str(),
        amount = %posting.amount,
        version = result.version,
        "ledger entry posted"
    );
    Ok(result)
}

/// Posts one entry inside the caller's transaction (top-ups credit the
/// ledger in the same transaction that records the successful charge).
pub async fn post_in_transaction(
    connection: &mut PgConnection,
    caller: &Caller,
    posting: &Posting,
) -> Result<PostingResult, BillingError> {
    debug_assert!(
        posting.amount > Decimal::ZERO,
        "postings carry a positive amount"
    );
    let account_row = sqlx::query(LOCK_ACCOUNT_SQL)
        .bind(posting.account_id.as_str())
        .fetch_optional(&mut *connection)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    let account = account_from_row(&account_row)?;

    let fingerprint = posting.fingerprint();
    let key = posting.idempotency_key.as_str();
    if let Some(previous) = idempotency::previous_response(
        connection,
        account.account_id.as_str(),
        key,
        "post",
        &fingerprint,
    )
    .await?
    {
        return idempotency::decode(previous);
    }

    let signed_amount = posting.signed_amount();
    let new_balance = account.balance + signed_amount;
    let new_total_balance = new_balance + account.credit_limit;
    if posting.kind.is_debit() && !posting.allow_overdraft && new_total_balance < Decimal::ZERO {
        return Err(BillingError::precondition(
            Reason::InsufficientFunds,
            format!("accounts/{}", account.account_id),
            format!(
                "insufficient funds: total_balance is {}, the debit is {}",
                account.currency.display(account.total_balance()),
                account.currency.display(posting.amount)
            ),
        ));
    }
    if new_balance.abs() >= Decimal::from(BALANCE_LIMIT) {
        return Err(BillingError::precondition(
            Reason::BalanceLimitExceeded,
            format!("accounts/{}", account.account_id),
            "the balance would exceed the largest allowed",
        ));
    }

    let transaction_id = Uuid::now_v7();
    let metadata_json =
        serde_json::to_value(&posting.metadata).map_err(|e| BillingError::Unexpected(e.into()))?;
    // One statement: move the balance, append the entry and its event.
    let row = sqlx::query(include_str!("post_entry.sql"))
        .bind(posting.account_id.as_str())
        .bind(new_balance)
        .bind(transaction_id)
        .bind(posting.kind.as_str())
        .bind(signed_amount)
        .bind(&posting.description)
        .bind(metadata_json)
        .bind(key)
        .bind(posting.kind.event_kind())
        .bind(new_total_balance)
        .fetch_one(&mut *connection)
        .await?;
    let version: i64 = row.try_get("version")?;
    let entry = LedgerEntry {
        entry_id: row.try_get("entry_id")?,
        transaction_id,
        account_id: account.account_id.clone(),
        kind: posting.kind,
        amount: signed_amount,
        balance_after: new_balance,
        description: posting.description.clone(),
        metadata: posting.metadata.clone(),
        idempotency_key: Some(key.to_owned()),
        created_at: row.try_get("created_at")?,
    };
    let result = PostingResult {
        entry,
        balance: new_balance,
        total_balance: new_total_balance,
        version,
        currency: account.currency.code().to_owned(),
    };
    idempotency::remember_response(
        connection,
        account.account_id.as_str(),
        key,
        "post",
        &fingerprint,
        idempotency::encode(&result)?,
    )
    .await?;
    audit::record_keyed(
        connection,
        caller,
        if posting.kind.is_debit() {
            "debit"
        } else {
            "credit"
        },
        Some(account.account_id.as_str()),
        Some(&posting.idempotency_key),
        serde_json::json!({
            "transaction_id": transaction_id,
            "kind": posting.kind.as_str(),
            "amount": signed_amount.to_string(),
        }),
    )
    .await?;
    if posting.kind.is_debit() {
        // Counted when written; idempotent replays returned above.
        crate::telemetry::metrics::debit_posted();
    }
    Ok(result)
}
