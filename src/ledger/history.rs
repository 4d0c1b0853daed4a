//! The billing history: entries newest first, filtered and paged.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::{EntryKind, LedgerEntry};
use crate::error::BillingError;
use crate::ids::AccountId;
use crate::paging::Page;

#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Empty means every kind.
    pub kinds: Vec<EntryKind>,
    /// Inclusive.
    pub created_after: Option<DateTime<Utc>>,
    /// Exclusive.
    pub created_before: Option<DateTime<Utc>>,
}

pub async fn list_entries(
    pool: &PgPool,
    account_id: &AccountId,
    filter: &EntryFilter,
    page: &Page,
) -> Result<Vec<LedgerEntry>, BillingError> {
    let kinds: Vec<&str> = filter.kinds.iter().map(|k| k.as_str()).collect();
    let rows = sqlx::query(
        "SELECT entry_id, transaction_id, account_id, kind, amount, balance_after, description, metadata, \
                idempotency_key, created_at \
           FROM ledger_entries \
          WHERE account_id = $1 \
            AND (cardinality($2::text[]) = 0 OR kind = ANY($2)) \
            AND ($3::timestamptz IS NULL OR created_at >= $3) \
            AND ($4::timestamptz IS NULL OR created_at < $4) \
            AND ($5::bigint IS NULL OR entry_id < $5) \
          ORDER BY entry_id DESC \
          LIMIT $6",
    )
    .bind(account_id.as_str())
    .bind(&kinds)
    .bind(filter.created_after)
    .bind(filter.created_before)
    .bind(page.after_id)
    .bind(page.size)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let kind: String = row.try_get("kind")?;
            let metadata: serde_json::Value = row.try_get("metadata")?;
            Ok(LedgerEntry {
                entry_id: row.try_get("entry_id")?,
                transaction_id: row.try_get("transaction_id")?,
                account_id: row.try_get("account_id")?,
                kind: EntryKind::parse(&kind).ok_or_else(|| {
                    BillingError::Unexpected(anyhow::anyhow!("unknown entry kind {kind:?}"))
                })?,
                amount: row.try_get("amount")?,
                balance_after: row.try_get("balance_after")?,
                description: row.try_get("description")?,
                metadata: serde_json::from_value::<BTreeMap<String, String>>(metadata)
                    .unwrap_or_default(),
                idempotency_key: row.try_get("idempotency_key")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}
