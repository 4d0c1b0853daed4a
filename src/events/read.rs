//! Reading events after a cursor, up to the horizon: the one query that
//! serves catch-up and live delivery alike.

use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, Row};

use super::{BalanceEvent, BalanceEventKind};
use crate::error::BillingError;
use crate::ids::AccountId;
use crate::ledger::currency_from_column;

/// Which events a reader wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    AllAccounts,
    Account(AccountId),
}

// The currency comes from a correlated subquery (one primary-key lookup per
// event read), not a join: for a wide cursor range the planner chose a hash
// join that read the whole accounts table on every read.
const READ_ALL_SQL: &str = "\
SELECT e.cursor, e.account_id, e.sequence, e.kind, e.amount, e.balance_after,
       e.total_balance_after, e.transaction_id, e.created_at,
       (SELECT a.currency FROM accounts a WHERE a.account_id = e.account_id) AS currency
  FROM balance_events e
 WHERE e.cursor > $1 AND e.cursor <= $2
 ORDER BY e.cursor
 LIMIT $3";

const READ_ACCOUNT_SQL: &str = "\
SELECT e.cursor, e.account_id, e.sequence, e.kind, e.amount, e.balance_after,
       e.total_balance_after, e.transaction_id, e.created_at,
       (SELECT a.currency FROM accounts a WHERE a.account_id = e.account_id) AS currency
  FROM balance_events e
 WHERE e.account_id = $4 AND e.cursor > $1 AND e.cursor <= $2
 ORDER BY e.cursor
 LIMIT $3";

/// Up to `limit` events with `after < cursor <= horizon`, in cursor order.
/// `horizon` must come from [`super::Horizon`]: beyond it cursors are not final.
pub async fn read_events<'e>(
    executor: impl PgExecutor<'e>,
    filter: &EventFilter,
    after: i64,
    horizon: i64,
    limit: i64,
) -> Result<Vec<BalanceEvent>, BillingError> {
    if horizon <= after {
        return Ok(Vec::new());
    }
    let rows = match filter {
        EventFilter::AllAccounts => {
            sqlx::query(READ_ALL_SQL)
                .bind(after)
                .bind(horizon)
                .bind(limit)
                .fetch_all(executor)
                .await?
        }
        EventFilter::Account(account_id) => {
            sqlx::query(READ_ACCOUNT_SQL)
                .bind(after)
                .bind(horizon)
                .bind(limit)
                .bind(account_id.as_str())
                .fetch_all(executor)
                .await?
        }
    };
    rows.iter().map(event_from_row).collect()
}

fn event_from_row(row: &PgRow) -> Result<BalanceEvent, BillingError> {
    let kind_text: String = row.try_get("kind")?;
    let kind = BalanceEventKind::parse(&kind_text).ok_or_else(|| {
        BillingError::Unexpected(anyhow::anyhow!(
            "unknown balance event kind {kind_text:?} in the database"
        ))
    })?;
    let currency_text: String = row.try_get("currency")?;
    Ok(BalanceEvent {
        cursor: row.try_get("cursor")?,
        account_id: row.try_get("account_id")?,
        sequence: row.try_get("sequence")?,
        kind,
        amount: row.try_get("amount")?,
        balance_after: row.try_get("balance_after")?,
        total_balance_after: row.try_get("total_balance_after")?,
        transaction_id: row.try_get("transaction_id")?,
        created_at: row.try_get("created_at")?,
        currency: currency_from_column(&currency_text)?,
    })
}
