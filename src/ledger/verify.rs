//! The ledger invariant, checkable at any time: `balance == sum(entries)`.

use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::error::BillingError;
use crate::ids::AccountId;

#[derive(Debug, Clone)]
pub struct LedgerMismatch {
    pub account_id: String,
    pub balance: Decimal,
    pub sum_of_entries: Decimal,
}

#[derive(Debug, Clone)]
pub struct LedgerReport {
    pub accounts_checked: i64,
    pub mismatches: Vec<LedgerMismatch>,
}

/// Checks one account, or every account when `account_id` is `None`.
pub async fn verify_ledger(
    pool: &PgPool,
    account_id: Option<&AccountId>,
) -> Result<LedgerReport, BillingError> {
    // REPEATABLE READ: balances and entries are read from one snapshot.
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *transaction)
        .await?;
    let rows: Vec<(String, Decimal, Decimal, i64, i64)> = sqlx::query_as(
        "SELECT a.account_id, a.balance, COALESCE(SUM(e.amount), 0), a.version, COUNT(e.entry_id) \
           FROM accounts a LEFT JOIN ledger_entries e ON e.account_id = a.account_id \
          WHERE $1::text IS NULL OR a.account_id = $1 \
          GROUP BY a.account_id, a.balance, a.version",
    )
    .bind(account_id.map(|a| a.as_str()))
    .fetch_all(&mut *transaction)
    .await?;
    transaction.commit().await?;
    if account_id.is_some() && rows.is_empty() {
        return Err(BillingError::NotFound("account"));
    }
    let mismatches = rows
        .iter()
        .filter(|(_, balance, sum, version, count)| balance != sum || version != count)
        .map(|(account_id, balance, sum, _, _)| LedgerMismatch {
            account_id: account_id.clone(),
            balance: *balance,
            sum_of_entries: *sum,
        })
        .collect();
    Ok(LedgerReport {
        accounts_checked: rows.len() as i64,
        mismatches,
    })
}
