//! The write of a batch: one statement (`batch_debit.sql`) fed one array per
//! column, for every account of the batch at once.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::batch::{AccountOutcome, Waiting};
use super::{EntryKind, PostingResult};
use crate::error::BillingError;

/// What the write reports back.
pub(super) struct Written {
    /// Accounts whose balance and version moved.
    pub accounts_moved: i64,
    /// Idempotency keys stored: fewer than the debits when another
    /// transaction stored one first.
    pub keys_stored: i64,
}

/// Writes the accepted debits of every account in `outcomes`, in the order
/// given (each account's debits in sequence order).
pub(super) async fn write(
    connection: &mut PgConnection,
    batch: &[Waiting],
    outcomes: &[AccountOutcome],
    created_at: DateTime<Utc>,
) -> Result<Written, BillingError> {
    let mut accounts = AccountColumns::default();
    let mut columns = Columns::default();
    for outcome in outcomes.iter().filter(|o| !o.accepted.is_empty()) {
        accounts.account_ids.push(outcome.account_id.clone());
        accounts.balances.push(outcome.balance);
        accounts.versions.push(outcome.version);
        for accepted in &outcome.accepted {
            columns.push(&batch[accepted.index], &accepted.result)?;
        }
    }
    let row = sqlx::query(include_str!("batch_debit.sql"))
        .bind(accounts.account_ids)
        .bind(accounts.balances)
        .bind(accounts.versions)
        .bind(created_at)
        .bind(columns.account_ids)
        .bind(columns.entry_ids)
        .bind(columns.transaction_ids)
        .bind(columns.amounts)
        .bind(columns.balances_after)
        .bind(columns.totals_after)
        .bind(columns.sequences)
        .bind(columns.descriptions)
        .bind(columns.metadata)
        .bind(columns.keys)
        .bind(columns.request_hashes)
        .bind(columns.responses)
        .bind(columns.actors)
        .bind(columns.roles)
        .bind(columns.details)
        .bind(columns.actor_types)
        .bind(columns.trace_ids)
        .fetch_one(connection)
        .await?;
    Ok(Written {
        accounts_moved: row.try_get("accounts_moved")?,
        keys_stored: row.try_get("keys_stored")?,
    })
}

/// One array element per account that moves.
#[derive(Default)]
struct AccountColumns {
    account_ids: Vec<String>,
    balances: Vec<Decimal>,
    versions: Vec<i64>,
}

/// The batch's accepted debits, one array per column of `batch_debit.sql`.
#[derive(Default)]
struct Columns {
    account_ids: Vec<String>,
    entry_ids: Vec<i64>,
    transaction_ids: Vec<Uuid>,
    amounts: Vec<Decimal>,
    balances_after: Vec<Decimal>,
    totals_after: Vec<Decimal>,
    sequences: Vec<i64>,
    descriptions: Vec<String>,
    metadata: Vec<String>,
    keys: Vec<String>,
    request_hashes: Vec<String>,
    responses: Vec<String>,
    actors: Vec<String>,
    roles: Vec<String>,
    details: Vec<String>,
    actor_types: Vec<&'static str>,
    trace_ids: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, waiting: &Waiting, result: &PostingResult) -> Result<(), BillingError> {
        let entry = &result.entry;
        let json = |value: serde_json::Result<String>| {
            value.map_err(|e| BillingError::Unexpected(e.into()))
        };
        self.account_ids.push(entry.account_id.clone());
        self.entry_ids.push(entry.entry_id);
        self.transaction_ids.push(entry.transaction_id);
        self.amounts.push(entry.amount);
        self.balances_after.push(result.balance);
        self.totals_after.push(result.total_balance);
        self.sequences.push(result.version);
        self.descriptions.push(entry.description.clone());
        self.metadata
            .push(json(serde_json::to_string(&entry.metadata))?);
        self.keys
            .push(waiting.posting.idempotency_key.as_str().to_owned());
        self.request_hashes.push(waiting.fingerprint.clone());
        self.responses.push(json(serde_json::to_string(result))?);
        self.actors.push(waiting.caller.subject.clone());
        self.roles.push(waiting.caller.roles_label());
        self.actor_types
            .push(crate::audit::ActorType::of(&waiting.caller).as_str());
        self.trace_ids.push(waiting.caller.trace_id.clone());
        self.details
            .push(json(serde_json::to_string(&serde_json::json!({
                "transaction_id": entry.transaction_id,
                "kind": EntryKind::Usage.as_str(),
                "amount": entry.amount.to_string(),
            })))?);
        Ok(())
    }
}
